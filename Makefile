# musicrnn: every target is idempotent and builds what it needs first.
#   make train     venv + data + train the default model (~10 min on 2 cores), export it, print a tune
#   make test      venv + the whole test suite (fixture tunes; the corpus tests skip until `make data`)
#   make test-fast the same without the tests marked slow, for editing
#   make generate  runs/tunes.abc (10 tunes, replaced each time) through onnxruntime, with the model there
#   make serve     a local page at http://127.0.0.1:8000/ that writes, shows and plays tunes (no torch)
#   make train-long  the long-run model (<= 60 min on 2 cores) in runs/long/, scored on validation and essen
#   make bench     generation and training speed, memory, side by side (runs/bench.json)
#   make data-large  data/large.json, ~60k tunes (training tunes in 12 keys + essen), for scale measurements
#   make clean     removes runs/ (every model trained there, runs/long/ too, every tunebook and plot) and the test caches

PYTHON := .venv/bin/python
# make train runs as 2 processes (torchrun, gloo; on 2 cores, 1 thread each) where there are 2 cores or more: measured
# 0.96-1.12x the tokens/s of one process with 2 threads (make bench, 15e2b66 to 03bca5f), 1.00x (daf63f9's pair),
# 1.06-1.09x (13347fd's); without dropout, the same steps as 1 process
TRAIN_PROCS := $(shell nproc 2>/dev/null | awk '{print ($$1 >= 2) ? 2 : 1}')
TRAIN := $(PYTHON) musicrnn.py train --procs $(TRAIN_PROCS)
SOURCES := musicrnn.py checkpoint_files.py distributed.py abc_tokens.py abc_music.py abc_form.py abc_constraint.py sampler.py plots.py safe_write.py settings.py corpus.py cli.py

# chosen by measured experiments (README): two layers, dropout, half the tunes in a new key each epoch,
# at the rate and batch it was measured with; bf16 products (where the CPU has them) run faster than fp32
# (a 1 x 384 step 1.5x on this AMD host: docs/measurements.md), so its schedule spans 56 epochs of the 55 minutes
LONG_FLAGS := --num-layers 2 --hidden-dim 384 --dropout 0.3 --dropout-mask element --augment-key 0.5 --augment-unit 0.3 \
              --batch-size 32 --lr 4e-3 --epochs 56 --max-minutes 55

.PHONY: venv data data-large train train-long export generate serve bench test test-fast clean

venv: .venv/installed
.venv/installed: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

data: data/train.json
data/train.json data/validation.json data/essen.json &: data/build_corpus.py corpus.py abc_music.py abc_tokens.py abc_form.py | venv
	$(PYTHON) -m data.build_corpus --overwrite

data-large: data/large.json
data/large.json: data/train.json data/essen.json data/build_large.py abc_music.py | venv
	$(PYTHON) -m data.build_large --overwrite

runs/best.pt: data/train.json data/validation.json $(SOURCES) | venv
	$(TRAIN) --overwrite
	$(PYTHON) musicrnn.py evaluate --checkpoint runs/best.pt --data data/validation.json

export: runs/musicrnn.onnx
runs/musicrnn.onnx: runs/best.pt export.py exported_model.py
	$(PYTHON) export.py --checkpoint runs/best.pt --out runs/musicrnn.onnx --int8 --overwrite

train: runs/musicrnn.onnx
	$(PYTHON) infer_onnx.py --model runs/musicrnn.onnx --num 1 --seed 1

# generate, serve and bench use the model that is there (make train makes one where there is none): a
# changed source file or a git pull never retrains it behind the user's back
HAVE_MODEL = @test -f runs/musicrnn.onnx -a -f runs/best.pt || $(MAKE) --no-print-directory train

generate: | venv
	$(HAVE_MODEL)
	$(PYTHON) infer_onnx.py --model runs/musicrnn.onnx --num 10 --seed 0 --out runs/tunes.abc --overwrite

runs/long/best.pt: data/train.json data/validation.json data/essen.json $(SOURCES) | venv
	$(PYTHON) musicrnn.py train --out runs/long --overwrite $(LONG_FLAGS)
	$(PYTHON) musicrnn.py evaluate --checkpoint runs/long/best.pt --data data/validation.json
	$(PYTHON) musicrnn.py evaluate --checkpoint runs/long/best.pt --data data/essen.json

runs/long/musicrnn.onnx: runs/long/best.pt export.py exported_model.py
	$(PYTHON) export.py --checkpoint runs/long/best.pt --out runs/long/musicrnn.onnx --overwrite

train-long: runs/long/musicrnn.onnx
	$(PYTHON) infer_onnx.py --model runs/long/musicrnn.onnx --num 1 --seed 1

serve: | venv
	$(HAVE_MODEL)
	$(PYTHON) serve.py --model runs/musicrnn.onnx

bench: | venv
	$(HAVE_MODEL)
	$(PYTHON) bench.py --overwrite

test: venv
	$(PYTHON) -m pytest -q tests

test-fast: venv
	$(PYTHON) -m pytest -q -m "not slow" tests

clean:
	rm -rf runs .pytest_cache .hypothesis
