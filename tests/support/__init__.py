"""What tests and benchmarks share: tiny model stores (class UNet, Stable Diffusion, flow models,
LoRA files), the real-server starter, toy denoisers and the Gaussian mixture, the engine fakes, and
the k-diffusion oracle. Test modules import from here, never from each other."""
