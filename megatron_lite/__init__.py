"""megatron-lite: 3D-parallel transformer training that a laptop CPU can test."""
