# DPO from scratch, stage by stage. `make help` lists the targets; each is the command you would type yourself.
# Stages skip work already done (their output file exists); delete a run directory to redo it.

MODEL   ?= gpt2#                     gpt2 | gpt2-medium | gpt2-large | gpt2-xl
NGPU    ?= 1#                        GPUs per machine; >1 runs training under torchrun (DistributedDataParallel)
FSDP    ?= false#                    true: shard weights, gradients and optimizer state over all GPUs (FSDP2), not copies
OFFLOAD ?= false#                    true (with FSDP=true): the shards on the CPU, e.g. gpt2-xl on one 24 GB GPU
NNODES  ?= 1#                        machines: run the same make command on each, NODE_RANK=0 ... NNODES-1
NODE_RANK   ?= 0#                    this machine's index among the NNODES
MASTER_ADDR ?= 127.0.0.1#            address of the NODE_RANK=0 machine, reachable from all of them
MASTER_PORT ?= 29500#                a free TCP port on that machine
TRAIN_ARGS  ?=#                      appended to the sft and dpo commands, e.g. TRAIN_ARGS=--grad_checkpoint=true
EVAL_ARGS   ?=#                      appended to the judge.py command, e.g. EVAL_ARGS=--compile=true
RUN_DIR ?= runs/$(MODEL)#            where checkpoints, samples, judgments and figures go
TORCH   ?= torch==2.13.0#            the torch build to install, e.g. TORCH="torch --index-url https://download.pytorch.org/whl/cu124"
N_EVAL  ?= 0#                        evaluation prompts per temperature (0 = every single-turn test prompt)
DEMO    ?= runs/demo#                where `make demo` writes
BEST_OF ?= 128#                      Best of N in `make eval` (when a reward model exists): answers per prompt (paper: 128)
BEST_OF_PROMPTS ?= 256#              evaluation prompts Best of N runs on: it samples N x as many answers as a model
CHAT    ?= dpo:$(RUN_DIR)/dpo/final# the models `make chat` talks to, name:checkpoint,... (e.g. add sft:$(RUN_DIR)/sft/final)

PY     := .venv/bin/python
# torchrun when there is more than one process or FSDP asks for it: on one machine a private rendezvous
# (--standalone), on several the rendezvous at MASTER_ADDR:MASTER_PORT, which node 0 hosts
NODES  := $(if $(filter-out 1,$(NNODES)),--nnodes=$(NNODES) --node_rank=$(NODE_RANK) --master_addr=$(MASTER_ADDR) --master_port=$(MASTER_PORT),--standalone)
LAUNCH := $(if $(filter-out 1,$(NGPU))$(filter-out 1,$(NNODES))$(filter true,$(FSDP)),$(PY) -m torch.distributed.run $(NODES) --nproc_per_node=$(NGPU),$(PY))
TRAIN  := --fsdp=$(FSDP) --offload=$(OFFLOAD) $(TRAIN_ARGS)

.PHONY: help setup test demo demo-models frontier data sft dpo reward eval figures chat all bench memory gpu-check clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

setup: ## create .venv with torch ($(TORCH)) and the project + test tools (~2 min)
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"

test: ## run the test suite on CPU (~4 min on 2 cores)
	$(PY) -m pytest -q tests

# The demo: the same scripts on a synthetic HH-format task (data.py, section 2) with a 7M-parameter GPT, and a
# judge that knows the true reward. Adam-style optimizer and large learning rates suit a tiny model trained from
# scratch; beta = 0.5 keeps its DPO policy close enough to the reference that its answers stay well formed.
DEMO_ARGS ?=#                       appended to every demo training command (tests pass --max_steps=2)
DEMO_N    ?= 200#                   demo evaluation prompts per temperature
DEMO_BEST_OF ?= 16#                 demo Best of N: answers sampled from the SFT model per prompt
DEMO_PAIRS ?= 0#                    demo held-out pairs for the preference accuracy table (0 = all 500)
# fp32, although pick_device would choose bf16 on a CPU with AMX / AVX512-BF16: the 7M model's matmuls are too
# small for bf16 to pay (its SFT step: 0.88x the fp32 speed on a Zen 5 EPYC, 1.08x on an AMX Xeon), and one dtype
# keeps the demo's numbers the same on every machine.
DEMO_DTYPE := --dtype=float32
DEMO_TRAIN := $(DEMO_DTYPE) --dataset=synthetic --optimizer=adamw --batch_size=32 --micro_batch_size=32 --warmup_steps=10 --n_eval=128 --checkpoint_every=50

demo-models: ## the demo's base, SFT, DPO and reward models (the first 4 min of make demo; each skipped when done)
	$(PY) sft.py $(DEMO_TRAIN) --model=tiny --train_on=all --max_steps=300 --lr=3e-3 --eval_every=50 --out=$(DEMO)/base $(DEMO_ARGS)
	$(PY) sft.py $(DEMO_TRAIN) --model=$(DEMO)/base/final --lr=1e-3 --eval_every=25 --out=$(DEMO)/sft $(DEMO_ARGS)
	$(PY) dpo.py $(DEMO_TRAIN) --model=$(DEMO)/sft/final --lr=3e-4 --beta=0.5 --eval_every=25 --save_every=25 --out=$(DEMO)/dpo $(DEMO_ARGS)
	$(PY) reward.py $(DEMO_TRAIN) --model=$(DEMO)/sft/final --lr=3e-4 --eval_every=25 --out=$(DEMO)/reward $(DEMO_ARGS)

demo: demo-models ## the whole pipeline offline on a CPU: tiny GPT, synthetic task, ground-truth judge, Figure 3 (~5 min)
	$(PY) judge.py --dataset=synthetic --judge=groundtruth --models=base:$(DEMO)/base/final,sft:$(DEMO)/sft/final,dpo:$(DEMO)/dpo/final \
	    --dpo_steps=$(DEMO)/dpo --n=$(DEMO_N) $(DEMO_DTYPE) --max_new_tokens=40 --batch_size=100 --out=$(DEMO)/eval \
	    --best_of=$(DEMO_BEST_OF) --best_of_curve=true --scorer=$(DEMO)/reward/final \
	    --accuracy=reward_model:$(DEMO)/reward/final,dpo_implicit:implicit:$(DEMO)/dpo/final,sft_likelihood:likelihood:$(DEMO)/sft/final \
	    --accuracy_n=$(DEMO_PAIRS)
	$(PY) plot.py --out=$(DEMO)/eval --runs=$(DEMO)/sft,$(DEMO)/dpo

# The paper's Figure 2 (left) on the demo task: mean true reward vs KL(pi || pi_SFT) of DPO at five beta, IPO, cDPO,
# SimPO, ORPO (from the base model: it does its own SFT) and unlikelihood at two strengths each, and Best of N; and
# what DPO replaces (ppo.py): PPO at three beta_KL, PPO-GT (true reward) at two, online DPO at two beta, same prompts.
FRONTIER_ARGS ?=#                   appended to the frontier.py command, e.g. FRONTIER_ARGS=--steps=30
frontier: demo-models ## reward vs KL frontier on the demo task: every loss of dpo.py, PPO, PPO-GT, online DPO, Best of N: $(DEMO)/frontier
	$(PY) frontier.py --demo=$(DEMO) "--train=$(DEMO_TRAIN) --lr=3e-4" $(FRONTIER_ARGS)

data: ## download Anthropic HH-RLHF (~40 MB) and tokenize it
	$(PY) data.py --dataset=hh --split=train
	$(PY) data.py --dataset=hh --split=test

sft: $(RUN_DIR)/sft/final/model.safetensors ## supervised fine-tuning on the chosen responses (gpt2: ~1 h on one A100, an estimate)
$(RUN_DIR)/sft/final/model.safetensors:
	$(LAUNCH) sft.py --model=$(MODEL) --out=$(RUN_DIR)/sft $(TRAIN)

dpo: $(RUN_DIR)/dpo/final/model.safetensors ## DPO from the SFT checkpoint (gpt2: ~1.5 h on one A100, an estimate)
$(RUN_DIR)/dpo/final/model.safetensors: $(RUN_DIR)/sft/final/model.safetensors
	$(LAUNCH) dpo.py --model=$(RUN_DIR)/sft/final --out=$(RUN_DIR)/dpo $(TRAIN)

reward: $(RUN_DIR)/reward/final/model.safetensors ## reward model from the SFT checkpoint, for Best of N (about as long as DPO, an estimate)
$(RUN_DIR)/reward/final/model.safetensors: $(RUN_DIR)/sft/final/model.safetensors
	$(LAUNCH) reward.py --model=$(RUN_DIR)/sft/final --out=$(RUN_DIR)/reward $(TRAIN)

# Preference accuracy on the held-out pairs ("secretly a reward model") of DPO's implicit reward and SFT likelihood,
# and, once `make reward` has run, of the reward model, plus Best of $(BEST_OF) (win rate vs N) on $(BEST_OF_PROMPTS) prompts.
ACCURACY := dpo_implicit:implicit:$(RUN_DIR)/dpo/final,sft_likelihood:likelihood:$(RUN_DIR)/sft/final
WITH_RM  := --best_of=$(BEST_OF) --best_of_prompts=$(BEST_OF_PROMPTS) --best_of_curve=true --scorer=$(RUN_DIR)/reward/final \
            --accuracy=reward_model:$(RUN_DIR)/reward/final,$(ACCURACY)
eval: ## sample at 4 temperatures, judge with gpt-4o-mini vs the chosen response (needs OPENAI_API_KEY): results.md, samples.md; Best of N with a reward model
	$(PY) judge.py --models=base:$(MODEL),sft:$(RUN_DIR)/sft/final,dpo:$(RUN_DIR)/dpo/final --dpo_steps=$(RUN_DIR)/dpo --n=$(N_EVAL) --out=$(RUN_DIR)/eval \
	    $$(test -f $(RUN_DIR)/reward/final/model.safetensors && echo "$(WITH_RM)" || echo "--accuracy=$(ACCURACY)") $(EVAL_ARGS)

figures: ## Figure 3 (win rate vs temperature, vs DPO step, vs model size), training curves, answer length
	$(PY) plot.py --out=$(RUN_DIR)/eval --runs=$(RUN_DIR)/sft,$(RUN_DIR)/dpo

chat: ## talk to what you trained, several models side by side: make chat RUN_DIR=runs/demo CHAT=sft:...,dpo:...
	$(PY) chat.py --models=$(CHAT)

all: sft dpo reward eval figures ## the full GPU replication for MODEL, stage by stage

bench: ## speed: ours vs transformers and TRL (pip install -e '.[bench]'), bf16 vs fp32, against measured limits (CPU: ~7 min)
	$(PY) -m bench.train_step
	$(PY) -m bench.generate
	$(PY) -m bench.dpo_step
	$(PY) -m bench.tokenization
	$(PY) -m bench.padding
	$(PY) -m bench.fp32_head
	$(PY) -m bench.decode
	$(PY) -m bench.dpo_vs_trl

memory: ## per-GPU memory of each GPT-2 size with DDP, FSDP and FSDP + offload, computed (seconds)
	$(PY) -m bench.memory

gpu-check: ## the CUDA paths in one PASS/FAIL line each, in < 5 min (bf16, SDPA, fused AdamW, compile, DDP, fp16, generate, bench)
	$(PY) -m bench.gpu_check

clean: ## delete all runs (checkpoints, samples, judgments); the download cache stays
	rm -rf runs
