"""Models: loading a model's components from any source (loading), the Hugging Face cache and downloads (hub),
LoRAs (lora, lora_files) and VAE decoding of panorama latents (vae)."""
