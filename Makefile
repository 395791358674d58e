# Thin wrappers: every target calls `python -m pipeline <command>`; variables mirror the CLI flags.
# Usage: make extract BACKBONE=vgg19 LAYER=block2_pool DATA=path/to/images WEIGHTS=none SIZE=256
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Map each Make variable to its flag only when set, so the CLI's defaults stay the single source of truth.
flag = $(if $($(1)),--$(2) '$($(1))')
EXTRACT_FLAGS = $(call flag,BACKBONE,backbone) $(call flag,LAYER,layer) $(call flag,DATA,data) \
  $(call flag,WEIGHTS,weights) $(call flag,POOL,pool) $(call flag,DTYPE,dtype) $(call flag,BATCH,batch-size) \
  $(call flag,SIZE,image-size) $(call flag,RESIZE,resize) $(call flag,PREPROCESS,preprocess) $(call flag,OUT,out) \
  $(call flag,LABELS,labels) $(call flag,COMPRESSION,compression) $(call flag,SHARD,shard) \
  $(call flag,PRECISION,precision) $(call flag,ENGINE,engine) $(call flag,DEVICES,devices) \
  $(call flag,AUGMENT,augment) $(call flag,AUGMENT_POLICY,augment-policy) $(call flag,SEED,seed) $(if $(JIT),--jit) $(if $(OVERWRITE),--overwrite)
CLASSIFY_FLAGS = $(call flag,FEATURES,features) $(call flag,LAYER,layer) $(call flag,HEADS,heads) \
  $(call flag,REDUCE,reduce) $(call flag,CV,cv) $(call flag,SEED,seed) $(call flag,OUT,out) $(call flag,MEMORY,memory-budget) \
  $(if $(SAVE_ALL),--save-all) $(if $(NO_REPORT),--no-report)
PREDICT_FLAGS = $(call flag,MODEL,model) $(call flag,DATA,data) $(call flag,OUT,out) $(call flag,BATCH,batch-size) \
  $(if $(TRUST_PICKLE),--trust-pickle)
FINETUNE_FLAGS = $(call flag,MODEL,model) $(call flag,DATA,data) $(call flag,OUT,out) $(call flag,UNFREEZE,unfreeze) \
  $(call flag,HEAD_EPOCHS,head-epochs) $(call flag,EPOCHS,epochs) $(call flag,LR,lr) $(call flag,PATIENCE,patience) \
  $(call flag,BATCH,batch-size) $(call flag,SIZE,image-size) $(call flag,AUGMENT_POLICY,augment-policy) \
  $(call flag,PRECISION,precision) $(call flag,SEED,seed) $(if $(OVERWRITE),--overwrite) $(if $(TRUST_PICKLE),--trust-pickle)

.PHONY: install demo test test-all test-slow extract layers backbones weights classify predict audit finetune merge verify slurm-extract bench bench-gpu bench-finetune clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python >= 3.10 or run 'make PYTHON=python3 ...'" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m pipeline demo

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

extract: $(STAMP)
	$(PY) -m pipeline extract $(EXTRACT_FLAGS)

layers: $(STAMP)
	$(PY) -m pipeline layers $(call flag,BACKBONE,backbone) $(call flag,SIZE,image-size) $(call flag,FILTER,filter)

backbones: $(STAMP)
	$(PY) -m pipeline backbones $(call flag,FILTER,filter)

weights: $(STAMP)
	$(PY) -m pipeline weights $(call flag,BACKBONE,backbone)

classify: $(STAMP)
	$(PY) -m pipeline classify $(CLASSIFY_FLAGS)

predict: $(STAMP)
	$(PY) -m pipeline predict $(PREDICT_FLAGS)

audit: $(STAMP)
	$(PY) -m pipeline audit $(call flag,FEATURES,features) $(call flag,LAYER,layer) $(call flag,REDUCE,reduce) \
	  $(call flag,THRESHOLD,threshold) $(call flag,OUT,out) $(call flag,SEED,seed) $(call flag,MEMORY,memory-budget)

finetune: $(STAMP)
	$(PY) -m pipeline finetune $(FINETUNE_FLAGS)

merge: $(STAMP)
	$(PY) -m pipeline merge $(call flag,SHARDS_OF,shards-of) $(call flag,OUT,out) $(if $(VIRTUAL),--virtual) \
	  $(if $(OVERWRITE),--overwrite)

verify: $(STAMP)
	$(PY) -m pipeline verify $(if $(CACHE),'$(CACHE)',$(error CACHE=<file.h5> is required, e.g. make verify CACHE=cache/x.h5))

slurm-extract: $(STAMP)
	$(PY) -m pipeline slurm $(EXTRACT_FLAGS) $(call flag,SHARDS,shards) $(call flag,TASKS,tasks) \
	  $(call flag,PARTITION,partition) $(call flag,GPUS_PER_TASK,gpus-per-task) $(call flag,CPUS_PER_TASK,cpus-per-task) \
	  $(call flag,TIME,time) $(call flag,ACCOUNT,account) $(call flag,LOG_DIR,log-dir) $(if $(DRY_RUN),--dry-run)

bench: $(STAMP)
	$(PY) -m benchmarks $(call flag,SECTIONS,sections)

bench-gpu: $(STAMP)
	$(PY) -m benchmarks.gpu $(call flag,BATCH,batch-size)

bench-finetune: $(STAMP)
	$(PY) -m benchmarks.finetune_table $(call flag,DATA,data)

clean:
	rm -rf cache results build *.egg-info
