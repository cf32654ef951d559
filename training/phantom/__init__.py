"""Moved to the top-level `phantom` package (the node's demo sends phantom studies too, and the
node may not import training); these modules re-export it so that `training.phantom.*` keeps
working."""
