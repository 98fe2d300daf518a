# tomoscribe: the two commands a user needs are `make demo` and `make test`.
# Each installs whatever is missing first (scripts/setup.sh, idempotent).
SHELL := /bin/bash
PY := .venv/bin/python

.PHONY: setup test lint demo stop train train-head ablation encoder-swap encoders bench scope sample brought-lm

setup:
	@bash scripts/setup.sh

## test: install what is missing, then lint, type-check and run every test
test: setup
	$(PY) -m ruff check tomoscribe operators plugin tests benchmarks
	$(PY) -m mypy
	$(PY) -m pytest -q -ra --durations=15

lint: setup
	$(PY) -m ruff check tomoscribe operators plugin tests benchmarks
	$(PY) -m mypy

## demo: start Orthanc with tomoscribe on localhost, send the sample study, print the report
demo: setup
	@bash scripts/demo.sh start

## stop: stop the demo Orthanc
stop:
	@bash scripts/demo.sh stop

## train: retrain the shipped default model, stage by stage, as it was trained
## (about 5 h on 2 CPU cores, then the last refiner: 7 min on one H100, or about 2.2 h on 2 cores
## at the measured 0.31 s a patch, then 0.6.0's language side: about 50 min on 2 cores, then
## 0.7.0's slice branch and PSAT: about 1 h, then 0.8.0's kidney refiner run and language side: about
## 2 h; the README's "Training" section explains each stage).
## Every stage writes a version of its own (0.6.0+local.<hash of the weights>); the last one,
## which writes tomoscribe/weights, names the package's version, as a release does.
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' tomoscribe/__init__.py)
TRAIN := $(PY) -m tomoscribe.train --samples 1200 --cache checkpoints/cache-1200-48x96x96.pt
train: setup
	$(TRAIN) --checkpoint checkpoints/stage1 --out checkpoints/stage1-weights --head-channels 8 \
		--steps 3000 --minutes 85 --batch 4 --lm-start 150 --save-every 50
	$(TRAIN) --init checkpoints/stage1-weights --checkpoint checkpoints/stage1b \
		--out checkpoints/stage1b-weights --head-channels 16 --minutes 20 --batch 4 --lr 1e-3 --lm-start 0 \
		--lesion-weight 10 --lesion-dice 1
	$(TRAIN) --stage language --init checkpoints/stage1b-weights --checkpoint checkpoints/stage2 \
		--out checkpoints/stage2a-weights --steps 2000 --batch 32 --lr 1e-3 --threads 1
	$(TRAIN) --stage language --init checkpoints/stage2a-weights --checkpoint checkpoints/stage2 \
		--out checkpoints/stage2b-weights --steps 1500 --batch 32 --lr 5e-4
	$(TRAIN) --stage align --init checkpoints/stage2b-weights --checkpoint checkpoints/stage2 \
		--out checkpoints/stage2c-weights --align-dim 64 --steps 1500 --batch 128 --lr 1e-3
	$(PY) -m tomoscribe.train_refine --init checkpoints/stage2c-weights --checkpoint checkpoints/stage3 \
		--out checkpoints/stage3-weights --phantoms 400 --steps 6000 --minutes 35 --threads 2
	$(TRAIN) --stage language --init checkpoints/stage3-weights --checkpoint checkpoints/stage2 \
		--out checkpoints/stage3b-weights --refine-stats --steps 1500 --batch 32 --lr 5e-4
	$(TRAIN) --stage align --init checkpoints/stage3b-weights --checkpoint checkpoints/stage2 \
		--out checkpoints/stage3c-weights --steps 1500 --batch 128 --lr 1e-3
	$(PY) -m tomoscribe.train_refine --init checkpoints/stage3c-weights --checkpoint checkpoints/stage4 \
		--out checkpoints/stage4-weights --phantoms 400 --steps 6000 --minutes 30 --threads 2 \
		--lr 1e-3 --hint-jitter 0.7
	$(PY) -m tomoscribe.train_segtoken --init checkpoints/stage4-weights --checkpoint checkpoints/stage4 \
		--cache checkpoints/cache-1200-48x96x96.pt --out checkpoints/stage4b-weights --steps 800 --batch 32 --refer 4 --threads 2
	$(TRAIN) --stage align --init checkpoints/stage4b-weights --checkpoint checkpoints/stage4 \
		--out checkpoints/stage4c-weights --steps 1500 --batch 128 --lr 1e-3
	$(PY) -m tomoscribe.train_refine --init checkpoints/stage4c-weights --checkpoint checkpoints/stage5 \
		--out checkpoints/stage5-weights --phantoms 400 --steps 3149 --batch 8 --lr 2e-3 --hint-jitter 0.7 \
		--fresh --device auto --loaders 4
	$(TRAIN) --stage language --init checkpoints/stage5-weights --checkpoint checkpoints/stage6 \
		--out checkpoints/stage6-weights --refine-stats --refine-stats-mode owned --steps 1500 --batch 32 --lr 5e-4
	$(PY) -m tomoscribe.train_segtoken --init checkpoints/stage6-weights --checkpoint checkpoints/stage6 \
		--cache checkpoints/cache-1200-48x96x96.pt --out checkpoints/stage6b-weights --steps 800 --batch 32 --refer 4 --threads 2
	$(TRAIN) --stage align --init checkpoints/stage6b-weights --checkpoint checkpoints/stage6 \
		--out checkpoints/stage6c-weights --steps 1500 --batch 128 --lr 1e-3
	$(TRAIN) --stage language --init checkpoints/stage6c-weights --checkpoint checkpoints/stage7 \
		--out checkpoints/stage7-weights --slice-tokens 2 --psat-slices 16 \
		--steps 1000 --batch 32 --lr 5e-4
	$(TRAIN) --stage language --init checkpoints/stage7-weights --checkpoint checkpoints/stage7 \
		--out checkpoints/stage7a-weights --steps 1500 --batch 32 --lr 5e-4 --point-weight 3
	$(PY) -m tomoscribe.train_segtoken --init checkpoints/stage7a-weights --checkpoint checkpoints/stage7 \
		--cache checkpoints/cache-1200-48x96x96.pt --out checkpoints/stage7b-weights --steps 800 --batch 32 --refer 4 --threads 2
	$(TRAIN) --stage align --init checkpoints/stage7b-weights --checkpoint checkpoints/stage7 \
		--out checkpoints/stage7c-weights --steps 1500 --batch 128 --lr 1e-3 --version 0.7.0
	$(PY) -m tomoscribe.train_refine --init checkpoints/stage7c-weights --checkpoint checkpoints/stage8 \
		--out checkpoints/stage8-weights --phantoms 400 --steps 6840 --threads 2 --lr 5e-4 --hint-jitter 0.7 \
		--organ-share "right kidney" 0.3 --organ-share "left kidney" 0.3
	$(TRAIN) --stage language --init checkpoints/stage8-weights --checkpoint checkpoints/stage8 \
		--out checkpoints/stage8a-weights --steps 1000 --batch 32 --lr 5e-4 --point-weight 3
	$(PY) -m tomoscribe.train_segtoken --init checkpoints/stage8a-weights --checkpoint checkpoints/stage8 \
		--cache checkpoints/cache-1200-48x96x96.pt --out checkpoints/stage8b-weights --steps 800 --batch 32 --refer 4 --threads 2
	$(TRAIN) --stage align --init checkpoints/stage8b-weights --checkpoint checkpoints/stage8 \
		--out tomoscribe/weights --steps 1500 --batch 128 --lr 1e-3 --version $(VERSION)

## train-head: retrain the packaged head MR model (tomoscribe/weights-head-mr, named head-mr;
## tomoscribe/domain.py HEAD_MR) on 1,200 head phantoms, the chest-abdomen recipe's stages:
## joint (70 min on 2 CPU cores), two language runs, align, the organ-box refiner (40 min), a
## language run on the refiner's statistics (17 min), the <seg> token (14 min), align again
## (head-mr 0.1.0); then, as for the chest-abdomen model's 0.7.0, the TG-IS slice branch and
## PSAT: a language run (12 min, and 33 min of features and statistics the first time),
## the <seg> token (20 min) and align (head-mr 0.2.0); then the refiner trained on, twice, with
## 40% of its patches on lesions under 65 voxels (30 and 35 min), its weak lesion components
## dropped (head-mr 0.3.0); about 5 h on 2 CPU cores (README "A head MR model").
HEAD_VERSION := head-mr-0.3.0
HEAD_REFINE := $(PY) -m tomoscribe.train_refine --phantoms 400 --steps 6000 --threads 2 --lr 5e-4 \
	--hint-jitter 0.7 --small-share 0.4 --small-voxels 65
TRAIN_HEAD := $(PY) -m tomoscribe.train --domain mr-head --samples 1200 \
	--cache checkpoints/cache-mr-head-1200-48x96x96.pt
train-head: setup
	$(TRAIN_HEAD) --checkpoint checkpoints/head1 --out checkpoints/head1-weights \
		--steps 3000 --minutes 70 --batch 4 --lm-start 150 --save-every 50 --lesion-weight 10 --lesion-dice 1
	$(TRAIN_HEAD) --stage language --init checkpoints/head1-weights --checkpoint checkpoints/head2 \
		--out checkpoints/head2a-weights --steps 2000 --batch 32 --lr 1e-3 --threads 1
	$(TRAIN_HEAD) --stage language --init checkpoints/head2a-weights --checkpoint checkpoints/head2 \
		--out checkpoints/head2b-weights --steps 1500 --batch 32 --lr 5e-4
	$(TRAIN_HEAD) --stage align --init checkpoints/head2b-weights --checkpoint checkpoints/head2 \
		--out checkpoints/head2c-weights --align-dim 64 --steps 1500 --batch 128 --lr 1e-3
	$(PY) -m tomoscribe.train_refine --init checkpoints/head2c-weights --checkpoint checkpoints/head3 \
		--out checkpoints/head3-weights --phantoms 400 --steps 6000 --minutes 40 --threads 2 \
		--lr 2e-3 --hint-jitter 0.7 --fresh
	$(TRAIN_HEAD) --stage language --init checkpoints/head3-weights --checkpoint checkpoints/head4 \
		--out checkpoints/head4-weights --refine-stats --refine-stats-mode owned --steps 1500 --batch 32 --lr 5e-4
	$(PY) -m tomoscribe.train_segtoken --init checkpoints/head4-weights --checkpoint checkpoints/head4 \
		--cache checkpoints/cache-mr-head-1200-48x96x96.pt --out checkpoints/head4b-weights \
		--steps 800 --batch 32 --refer 4 --threads 2
	$(TRAIN_HEAD) --stage align --init checkpoints/head4b-weights --checkpoint checkpoints/head4 \
		--out checkpoints/head4c-weights --steps 1500 --batch 128 --lr 1e-3 --version head-mr-0.1.0
	$(TRAIN_HEAD) --stage language --init checkpoints/head4c-weights --checkpoint checkpoints/head5 \
		--out checkpoints/head5-weights --slice-tokens 2 --psat-slices 16 --steps 1000 --batch 32 --lr 5e-4
	$(PY) -m tomoscribe.train_segtoken --init checkpoints/head5-weights --checkpoint checkpoints/head5 \
		--cache checkpoints/cache-mr-head-1200-48x96x96.pt --out checkpoints/head5b-weights \
		--steps 800 --batch 32 --refer 4 --threads 2
	$(TRAIN_HEAD) --stage align --init checkpoints/head5b-weights --checkpoint checkpoints/head5 \
		--out checkpoints/head5c-weights --steps 1500 --batch 128 --lr 1e-3 --version head-mr-0.2.0
	$(HEAD_REFINE) --init checkpoints/head5c-weights --checkpoint checkpoints/head6 \
		--out checkpoints/head6-weights --minutes 30
	$(HEAD_REFINE) --init checkpoints/head6-weights --checkpoint checkpoints/head6b \
		--out tomoscribe/weights-head-mr --minutes 35 --seed 1 --min-lesion-prob 0.8 --version $(HEAD_VERSION)

## ablation: the README's ablation rows: from the 0.6.0 model (checkpoints/stage6c-weights, made
## by `make train`; 3D-only, refiner statistics in the region tokens), 0.7.0's two language runs
## (1,000 steps, then 1,500 with the pointing loss x3) for each of 3D-only, 3D + TG-IS and
## 3D + TG-IS + PSAT, then each scored on the test phantoms (2 CPU cores: frozen-vision features
## 7 min and the refiner's statistics 13 min the first time in each checkpoint folder, then
## about 17 min of training for the 3D-only row, 35 min for each other row, and 6 min a benchmark)
ABLATE := $(TRAIN) --stage language --batch 32 --lr 5e-4
ablation: setup
	$(ABLATE) --init checkpoints/stage6c-weights --checkpoint checkpoints/ablation-3d \
		--out checkpoints/ablation-3d-a --steps 1000
	$(ABLATE) --init checkpoints/ablation-3d-a --checkpoint checkpoints/ablation-3d \
		--out checkpoints/ablation-3d --steps 1500
	$(ABLATE) --init checkpoints/stage6c-weights --checkpoint checkpoints/ablation \
		--out checkpoints/ablation-tgis-a --steps 1000 --slice-tokens 2
	$(ABLATE) --init checkpoints/ablation-tgis-a --checkpoint checkpoints/ablation \
		--out checkpoints/ablation-tgis --steps 1500 --point-weight 3
	$(ABLATE) --init checkpoints/stage6c-weights --checkpoint checkpoints/ablation \
		--out checkpoints/ablation-psat-a --steps 1000 --slice-tokens 2 --psat-slices 16
	$(ABLATE) --init checkpoints/ablation-psat-a --checkpoint checkpoints/ablation \
		--out checkpoints/ablation-psat --steps 1500 --point-weight 3
	for m in 3d tgis psat; do $(PY) benchmarks/accuracy.py --model-dir checkpoints/ablation-$$m \
		--json benchmarks/results/ablation-$$m.json; done

## brought-lm: a language model brought as a transformers folder (a new-weights Llama with a
## generic BPE tokenizer) against the built-in GPT-2 taken through the same path, each trained
## from new weights on the shipped vision side with the same language steps, then scored on the
## test phantoms (README "Bringing your own language model")
BROUGHT := $(TRAIN) --stage language --init tomoscribe/weights --checkpoint checkpoints/brought \
	--steps 3000 --batch 32 --lr 1e-3 --threads 1 --slice-tokens 0 --psat-slices 0
brought-lm: setup
	$(PY) benchmarks/brought_lm.py --out checkpoints/brought-llama
	$(PY) benchmarks/brought_lm.py --out checkpoints/brought-gpt2 --arch gpt2-words
	$(BROUGHT) --lm checkpoints/brought-llama --out checkpoints/with-llama
	$(BROUGHT) --lm checkpoints/brought-gpt2 --out checkpoints/with-gpt2
	for m in llama gpt2; do $(PY) benchmarks/accuracy.py --model-dir checkpoints/with-$$m \
		--json benchmarks/results/brought-$$m.json; done
	$(PY) benchmarks/brought_lm.py --time tomoscribe/weights checkpoints/with-gpt2 checkpoints/with-llama

## encoder-swap: the full-pipeline encoder row: the shipped model with its 3D encoder replaced by
## new weights, DCFormer's or the 3D ViT's, everything else continued from tomoscribe/weights;
## for each, the same 300 segmentation steps, language stage and alignment, then the test
## phantoms and image-report retrieval over 200 of them; then each model's coarse segmentation
## on 40 validation phantoms (README "Ablation: DCFormer against a 3D ViT"; about 50 min a row on
## 2 CPU cores)
SWAP = $(TRAIN) --init tomoscribe/weights --checkpoint checkpoints/swap-$(1) \
		--out checkpoints/swap-$(1)-joint --encoder $(1) --fresh-encoder --steps 300 --batch 4 \
		--lm-start 1000000000 --save-every 50 && \
	$(TRAIN) --stage language --init checkpoints/swap-$(1)-joint --checkpoint checkpoints/swap-$(1) \
		--out checkpoints/swap-$(1)-lang --steps 1000 --batch 32 --lr 5e-4 --point-weight 3 && \
	$(TRAIN) --stage align --init checkpoints/swap-$(1)-lang --checkpoint checkpoints/swap-$(1) \
		--out checkpoints/swap-$(1)-weights --steps 1500 --batch 128 --lr 1e-3 && \
	$(PY) benchmarks/accuracy.py --n 60 --model-dir checkpoints/swap-$(1)-weights \
		--json benchmarks/results/swap-$(1)-test60.json && \
	$(PY) benchmarks/retrieval.py --n 200 --model-dir checkpoints/swap-$(1)-weights \
		--json benchmarks/results/swap-$(1)-retrieval200.json
encoder-swap: setup
	$(call SWAP,vit)
	$(call SWAP,dcformer)
	$(PY) benchmarks/encoders.py --score checkpoints/swap-vit-weights \
		checkpoints/swap-dcformer-weights tomoscribe/weights --json benchmarks/results/swap-coarse.json

## encoders: the ablation's encoder row: DCFormer and a 3D ViT of the same size, each
## trained from new weights for the same segmentation steps, scored on validation phantoms
encoders: setup
	$(PY) benchmarks/encoders.py --steps 300

## bench: accuracy of the shipped model vs an image-blind baseline on held-out phantoms,
## then every question wording it recognises, as typed and as answered, then where the
## findings go wrong on 120 validation phantoms (about 8 min)
bench: setup
	$(PY) benchmarks/accuracy.py
	$(PY) benchmarks/questions.py
	$(PY) benchmarks/misses.py

## scope: which studies the shipped model refuses (chest-abdomen CT, with and without Body Part
## Examined; head CT without it; head MR with and without it; a torso written as MR), 60 test
## phantoms each (about 12 min on 2 CPU cores)
scope: setup
	$(PY) benchmarks/scope.py

## sample: (re)generate the sample phantom study under samples/
sample: setup
	$(PY) -m tomoscribe.phantom --seed 9 --out samples/phantom-ct
