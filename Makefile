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
  $(call flag,LABELS,labels) $(call flag,PATH_COLUMN,path-column) $(call flag,LABEL_COLUMN,label-column) \
  $(call flag,COMPRESSION,compression) $(call flag,SHARD,shard) $(call flag,MANIFEST,manifest) \
  $(call flag,WORKERS,workers) $(call flag,PRECISION,precision) $(call flag,ENGINE,engine) $(call flag,DEVICES,devices) \
  $(call flag,AUGMENT,augment) $(call flag,AUGMENT_POLICY,augment-policy) $(call flag,SEED,seed) \
  $(call flag,MAX_PIXELS,max-pixels) $(call flag,CALIBRATION_IMAGES,calibration-images) $(call flag,CALIBRATION,calibration) $(if $(JIT),--jit) $(if $(OVERWRITE),--overwrite)
CLASSIFY_FLAGS = $(call flag,FEATURES,features) $(call flag,LAYER,layer) $(call flag,HEADS,heads) \
  $(call flag,REDUCE,reduce) $(call flag,CV,cv) $(call flag,SEED,seed) $(call flag,OUT,out) $(call flag,MEMORY,memory-budget) \
  $(call flag,METRIC,metric) $(if $(SAVE_ALL),--save-all) $(if $(NO_REPORT),--no-report) $(if $(LIST),--list)
PREDICT_FLAGS = $(call flag,MODEL,model) $(call flag,DATA,data) $(call flag,OUT,out) $(call flag,BATCH,batch-size) \
  $(call flag,MEMORY,memory-budget) $(if $(OVERWRITE),--overwrite) $(if $(TRUST_PICKLE),--trust-pickle)
FINETUNE_FLAGS = $(call flag,MODEL,model) $(call flag,DATA,data) $(call flag,OUT,out) $(call flag,UNFREEZE,unfreeze) \
  $(call flag,HEAD_EPOCHS,head-epochs) $(call flag,EPOCHS,epochs) $(call flag,HEAD_LR,head-lr) $(call flag,LR,lr) \
  $(call flag,PATIENCE,patience) $(call flag,BATCH,batch-size) $(call flag,SIZE,image-size) \
  $(call flag,AUGMENT_POLICY,augment-policy) $(call flag,MONITOR_FRACTION,monitor-fraction) \
  $(call flag,PRECISION,precision) $(call flag,WORKERS,workers) $(call flag,SEED,seed) $(if $(OVERWRITE),--overwrite) \
  $(if $(TRUST_PICKLE),--trust-pickle)
# DEBUG=1: every command shows the full traceback of a failure and TensorFlow's own log lines
PIPELINE = $(PY) -m pipeline $(if $(DEBUG),--debug)

.PHONY: install demo test test-all test-slow extract layers backbones weights classify predict audit finetune merge verify slurm-extract bench bench-gpu bench-finetune clean clean-data

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python >= 3.10 or run 'make PYTHON=python3 ...'" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PIPELINE) demo $(call flag,DATA,data) $(call flag,OUT,out)

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# Mutation testing (mutmut) of the core modules, each against its own tests; prints killed/total per module. Slow
# (minutes per module), never part of `make test`. One module: make mutate MODULES=classifiers/stats.py (docs/testing.md)
mutate: $(STAMP)
	nice -n 10 $(PY) tests/mutate.py $(MODULES) $(if $(JOBS),--jobs $(JOBS)) $(foreach t,$(DESELECT),--deselect '$(t)')

extract: $(STAMP)
	$(PIPELINE) extract $(EXTRACT_FLAGS)

layers: $(STAMP)
	$(PIPELINE) layers $(call flag,BACKBONE,backbone) $(call flag,SIZE,image-size) $(call flag,FILTER,filter) \
	  $(call flag,PREPROCESS,preprocess)

backbones: $(STAMP)
	$(PIPELINE) backbones $(call flag,FILTER,filter)

weights: $(STAMP)
	$(PIPELINE) weights $(call flag,BACKBONE,backbone)

classify: $(STAMP)
	$(PIPELINE) classify $(CLASSIFY_FLAGS)

predict: $(STAMP)
	$(PIPELINE) predict $(PREDICT_FLAGS)

audit: $(STAMP)
	$(PIPELINE) audit $(call flag,FEATURES,features) $(call flag,LAYER,layer) $(call flag,REDUCE,reduce) \
	  $(call flag,THRESHOLD,threshold) $(call flag,OUT,out) $(call flag,SEED,seed) $(call flag,MEMORY,memory-budget)

finetune: $(STAMP)
	$(PIPELINE) finetune $(FINETUNE_FLAGS)

merge: $(STAMP)
	$(PIPELINE) merge $(call flag,SHARDS_OF,shards-of) $(call flag,OUT,out) $(if $(VIRTUAL),--virtual) \
	  $(if $(OVERWRITE),--overwrite)

verify: $(STAMP)
	$(PIPELINE) verify $(if $(CACHE),'$(CACHE)',$(error CACHE=<file.h5> is required, e.g. make verify CACHE=cache/x.h5))

slurm-extract: $(STAMP)
	$(PIPELINE) slurm $(EXTRACT_FLAGS) $(call flag,SHARDS,shards) $(call flag,TASKS,tasks) \
	  $(call flag,PARTITION,partition) $(call flag,GPUS_PER_TASK,gpus-per-task) $(call flag,CPUS_PER_TASK,cpus-per-task) \
	  $(call flag,TIME,time) $(call flag,ACCOUNT,account) $(call flag,LOG_DIR,log-dir) \
	  $(call flag,MAX_RUNNING,max-running) $(if $(DRY_RUN),--dry-run)

bench: $(STAMP)
	$(PY) -m benchmarks $(call flag,SECTIONS,sections) $(call flag,SCALE_IMAGES,scale-images)

bench-gpu: $(STAMP)
	$(PY) -m benchmarks.gpu $(call flag,BATCH,batch-size)

bench-finetune: $(STAMP)
	$(PY) -m benchmarks.finetune_table $(call flag,DATA,data)

# docs/report.png: the first screen of the demo's report.html (rerun into results/demo) in headless chromium, driven
# by Playwright with the system's chromium (Debian: apt-get install -y chromium); nothing is downloaded.
.PHONY: report-screenshot
report-screenshot: $(STAMP)
	$(PIPELINE) demo --out results/demo
	$(PY) -m pipeline.page results/demo/report.html docs/report.png

# Build artefacts only; your caches and results stay (make clean-data deletes those). The venv stays too.
clean:
	rm -rf build dist *.egg-info .pytest_cache mutants
	find . -path './$(VENV)' -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

# Your data: the feature caches ($FEATURE_CACHE_DIR, else cache/), the classify/audit runs (results/) and predict's
# CSVs with their caches (predictions/). Lists each folder with its size, then deletes it; refuses a folder that holds
# this one or your home folder.
CACHE_DIR = $(or $(FEATURE_CACHE_DIR),cache)
RESULTS_DIR = results
PREDICTIONS_DIR = predictions
clean-data:
	@found=(); here=$$(pwd -P); home=$$(cd ~ 2>/dev/null && pwd -P); \
	for d in '$(CACHE_DIR)' '$(RESULTS_DIR)' '$(PREDICTIONS_DIR)'; do \
	  [ -e "$$d" ] || [ -L "$$d" ] || continue; \
	  real=$$(cd "$$d" 2>/dev/null && pwd -P) || { echo "error: '$$d' is not a folder; delete it yourself if it should go" >&2; exit 2; }; \
	  for keep in "$$here" "$$home"; do \
	    case "$$keep/" in "$${real%/}/"*) echo "error: refusing to delete '$$d' ($$real): that would delete $$keep. Point FEATURE_CACHE_DIR at the cache folder itself." >&2; exit 2;; esac; \
	  done; \
	  found+=("$$d"); \
	done; \
	echo "caches live in $(CACHE_DIR)/ ($(if $(FEATURE_CACHE_DIR),from FEATURE_CACHE_DIR,the default; set FEATURE_CACHE_DIR to move them)), results in $(RESULTS_DIR)/, predictions in $(PREDICTIONS_DIR)/"; \
	if [ $${#found[@]} -eq 0 ]; then echo "nothing to delete: none of them exists"; exit 0; fi; \
	echo "deleting (your data; make clean keeps it):"; \
	for d in "$${found[@]}"; do echo "  $$d/  $$(du -sh -- "$$d" | cut -f1), $$(find "$$d" -type f | wc -l | tr -d ' ') files"; done; \
	rm -rf -- "$${found[@]}"; echo "deleted."
