"""safetensors I/O and pure key maps between layouts."""
