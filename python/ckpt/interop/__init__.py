"""Moving versions in and out of other formats (safetensors; .npz and .npy via the CLI)."""
