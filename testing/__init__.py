"""What the tests check quantkit against, and what they and the benchmarks build their inputs from:
ggml's reference quantizers (ggml_ref), llama.cpp's converter and quantizer (llamacpp_ref),
searches.cu built for the host (host_searches), and synthetic checkpoints of each family's shapes
(synthetic). Installed as `quantkit.testing` because the speed benchmarks need them too; nothing in
the export, merge or GPTQ paths imports it.
"""
