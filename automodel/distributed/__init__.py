"""Running on several processes: process groups, meshes, sharding, launching torchrun."""
