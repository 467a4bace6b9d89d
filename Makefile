# musicrnn: every target is idempotent and builds what it needs first.
#   make train     venv + data + train the default model (~10 min on 2 cores), export it, print a tune
#   make test      venv + the test suite (fixture data only; no `make data` needed)
#   make generate  runs/tunes.abc through onnxruntime
#   make bench     generation and training speed, memory, side by side (runs/bench.json)

PYTHON := .venv/bin/python
SOURCES := musicrnn.py abctext.py

.PHONY: venv data train export generate bench test clean

venv: .venv/installed
.venv/installed: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

data: data/train.json
data/train.json data/validation.json data/essen.json: data/build_corpus.py musicrnn.py abctext.py | venv
	$(PYTHON) -m data.build_corpus

runs/best.pt: data/train.json data/validation.json $(SOURCES) | venv
	$(PYTHON) musicrnn.py train --overwrite
	$(PYTHON) musicrnn.py evaluate --checkpoint runs/best.pt --data data/validation.json

export: runs/musicrnn.onnx
runs/musicrnn.onnx: runs/best.pt export.py infer_onnx.py
	$(PYTHON) export.py --checkpoint runs/best.pt --out runs/musicrnn.onnx --int8

train: runs/musicrnn.onnx
	$(PYTHON) infer_onnx.py --model runs/musicrnn.onnx --num 1 --seed 1

generate: runs/musicrnn.onnx
	$(PYTHON) infer_onnx.py --model runs/musicrnn.onnx --num 10 --seed 0 --out runs/tunes.abc

bench: runs/musicrnn.onnx
	$(PYTHON) bench.py

test: venv
	$(PYTHON) -m pytest -q tests

clean:
	rm -rf runs .pytest_cache .hypothesis
