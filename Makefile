# The targets CI and the README use. `make demo` and `make test` each create .venv when needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch/torchvision wheels: see README "Quick start" (CUDA wheels also run on a CPU-only machine).
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast lint benchmark sample-studies clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	mkdir -p demo_output
	$(BIN)/pneumobatch predict sample_studies -m pneumonia -m etiology -o demo_output/predictions.csv --overwrite --heatmaps positive; test $$? -le 1
	$(BIN)/pneumobatch report demo_output/predictions.csv --labels sample_studies/labels.csv --model pneumonia -o demo_output/report_pneumonia.pdf
	$(BIN)/pneumobatch report demo_output/predictions.csv --labels sample_studies/labels.csv --label-column finding --model etiology -o demo_output/report_etiology.pdf
	$(BIN)/pneumobatch calibrate demo_output/predictions.csv --labels sample_studies/labels.csv --model pneumonia -o demo_output/site.json --overwrite
	$(BIN)/pneumobatch predict sample_studies -m pneumonia -m etiology --site demo_output/site.json -o demo_output/predictions_site.csv --overwrite --quiet; test $$? -le 1
	$(BIN)/pneumobatch report demo_output/predictions_site.csv --labels sample_studies/labels.csv --model pneumonia -o demo_output/report_site.pdf --quiet
	$(BIN)/pneumobatch monitor demo_output/predictions.run.json demo_output/predictions_site.run.json --baseline 1 -o demo_output/monitor.pdf
	$(BIN)/pneumobatch audit demo_output/predictions.csv sample_studies --model pneumonia -o demo_output/audit.pdf --overwrite
	@echo "predictions: demo_output/predictions.csv (studies: demo_output/predictions.studies.csv)"
	@echo "heatmaps:    demo_output/predictions.heatmaps/ (column heatmap): what the models looked at in the positives"
	@echo "reports:     demo_output/report_pneumonia.pdf demo_output/report_etiology.pdf"
	@echo "site file:   demo_output/site.json, applied in demo_output/predictions_site.csv;"
	@echo "             shipped vs site operating points: demo_output/report_site.pdf"
	@echo "monitoring:  demo_output/monitor.pdf (.json, .prom)"
	@echo "audit:       demo_output/audit.pdf (.json): header shortcut, export invariance, applicability"
	@echo "NOTE: calibrate, monitor and audit ran on the 33 sample images of sample_studies/: far too few to fit"
	@echo "      a site's operating point (calibrate warns), to judge drift or a header shortcut; they show the commands and files."
	@echo "      The monitor compares the shipped run with the site-calibrated one, so it reports that change."

# The PACS tests run against a real Orthanc; this installs it when missing (as root, apt).
test: $(STAMP)
	sh scripts/install_orthanc.sh
	$(BIN)/python -m pytest -q

# While working: everything but the tests marked slow (Ray, real subprocesses, Orthanc, training).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check pneumobatch tests benchmarks scripts
	$(BIN)/ruff format --check pneumobatch tests benchmarks scripts

benchmark: $(STAMP)
	$(BIN)/python benchmarks/throughput.py

sample-studies: $(STAMP)
	$(BIN)/python scripts/make_sample_studies.py ../shared/datasets/cxr sample_studies

clean:
	rm -rf demo_output .pytest_cache
