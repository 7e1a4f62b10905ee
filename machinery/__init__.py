"""The machinery below the lesson files: what makes them fast, distributed, resumable and robust without being the
lesson itself. Nothing here imports a lesson file or an entry script (tests/test_layout.py parses the imports to
check it): what a module needs from above, a block class to shard or a function that computes log-probs, is passed
in. Each module opens with what it speeds up or guards, measured, with the command.

    common.py            settings parser, device and dtype, downloads, atomic files, content hashes
    safetensors_file.py  the weights' file format, read and written by hand
    vocab_head.py        exact response log-probs in bounded memory (the vocabulary projection of training)
    fast_generate.py     model.GPT.generate's tokens, sooner (prepared weights, compiled decode step)
    batch_order.py       length-grouped, seeded, resumable batches; the evaluation subset
    distributed.py       DDP, FSDP2, CPU offload: the processes of a torchrun job
    checkpoints.py       exact resume after kill -9 or Ctrl-C; atomic saves
    model_bundle.py      several models trained together (PPO's policy and value) as one checkpoint
    reference_logps.py   DPO's reference log-probs, computed once and cached
    answer_store.py      the evaluation's answers and Best-of-N pool on disk, reused only for the same weights
    openai_client.py     the judge's API calls: key and endpoint, retries, concurrency, cost
    results_tables.py    results.md, samples.md, accuracy.md: the evaluation's numbers as tables
    preference_files.py  the hub's data files (HH, SHP) and yours, checked whole: errors name the file and line
    tokenized_pairs.py   the tokenized pairs' ragged arrays (ids end to end + offsets), saved without pickle
    transformers_files.py  what makes a checkpoint open in transformers as it is (config keys, vocab, merges)
"""
