# Every target does its own set-up: `make test` and `make demo` work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.etf-installed
TORCH  := torch==2.14.1 torchvision==0.29.1
CACHE  ?= cache
DATA   ?= lfw-subset
ENCODERS ?= vit_t,resnet18,convnext_atto
SEEDS  ?= 0,1,2
JOBS   ?= 2
ABLATION ?= ablations/default.toml
comma  := ,

.PHONY: install test demo bench lint ablations clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest tests

lint: install
	$(BIN)/ruff check etf tests bench
	$(BIN)/ruff format --check etf tests bench

bench: install
	$(BIN)/python bench/startup.py
	$(BIN)/python bench/extract.py
	$(BIN)/python bench/fit.py
	$(BIN)/python bench/ablate.py
	$(BIN)/python bench/ablate.py --views 4 --skip-reextract
	$(BIN)/python bench/views.py
	$(BIN)/python bench/storage.py
	$(BIN)/python bench/paper_fuser.py
	$(BIN)/python bench/scale.py
	$(BIN)/python bench/export.py
	$(BIN)/python bench/probe.py

# Random-init tiny encoders: the demo must run offline. Drop --no-pretrained with network access.
DEMO_IMAGES = $${ETF_DATA_HOME:-$$HOME/.cache/etf/data}/lfw-subset
demo: install
	$(BIN)/etf extract --data lfw-subset --encoder vit_t --encoder resnet18 --no-pretrained --img-size 64 --cache $(CACHE)
	$(BIN)/etf cache ls $(CACHE)
	$(BIN)/etf fit --data lfw-subset --cache $(CACHE) --encoders vit_t,resnet18 --fuser etfuser --epochs 20 --out runs/demo-etfuser --overwrite
	$(BIN)/etf fit --data lfw-subset --cache $(CACHE) --encoders vit_t,resnet18 --fuser linear --epochs 20 --out runs/demo-linear --overwrite
	$(BIN)/etf predict --run runs/demo-etfuser $(DEMO_IMAGES)/face/000.png $(DEMO_IMAGES)/nonface/100.png
	$(BIN)/etf predict --run runs/demo-etfuser --infer canonical $(DEMO_IMAGES)/face/000.png $(DEMO_IMAGES)/nonface/100.png

# The default grid end to end: extract whatever stores are missing (a complete store is found,
# not recomputed), then every subset of $(ENCODERS) x fusers x masks x $(SEEDS) from the cache,
# $(JOBS) fits at a time. Random-init encoders, as in the demo, so that it runs offline.
ablations: install
	$(BIN)/etf extract --data $(DATA) $(patsubst %,--encoder %,$(subst $(comma), ,$(ENCODERS))) --no-pretrained --img-size 64 --cache $(CACHE)
	$(BIN)/etf ablate --config $(ABLATION) --data $(DATA) --encoders $(ENCODERS) --seeds $(SEEDS) --jobs $(JOBS) --cache $(CACHE)

clean:
	rm -rf $(CACHE) runs demo .pytest_cache
