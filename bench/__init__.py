"""The benchmarks: one script per question, each run from the repository root as `python -m bench.<name>`, all on
one shared module (timing.py). `make bench` runs the first eight in this order; README "Speed" has their numbers.

    train_step.py    is our training step as fast as transformers'? (tokens/s, MFU, HFU, memory)
    generate.py      a generate call: ours vs transformers.generate vs no KV cache, and the same tokens?
    dpo_step.py      DPO's step: fused vs two forwards, precomputed vs live reference, beside an SFT step
    tokenization.py  data.py's tokenization vs tiktoken alone and transformers' fast tokenizer
    padding.py       the padding that length-grouped batches save
    fp32_head.py     what the exact fp32 vocabulary projection costs a step, vs a bf16 one
    decode.py        gpt2's decode step against the bytes it must read; vs model.generate and transformers.generate
    dpo_vs_trl.py    gpt2's DPO optimizer step by part, against its floor and TRL's DPOTrainer
    memory.py        per-GPU memory of each GPT-2 size with DDP, FSDP, FSDP + offload, computed (make memory)
    head_memory.py   the memory vocab_head.py saves, measured; the head's share of a GPU step, estimated
    gpu_check.py     the CUDA paths, one PASS / FAIL / SKIP line each (make gpu-check)
    timing.py        what they share: the race, memory peaks, the measured limits, the baselines
"""
