"""Pure-functional SSM ops: the math of the Mamba and Mamba-2 papers, no parameters."""
