# Two commands on a fresh clone: `make run` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: run test test-kernels setup bench federation-test netns-test cluster-test launcher-test gpu-bundle gpu-smoke clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# The default job: the paper's Fig. 1 (toy, Top-1 vs RegTop-1 vs dense)
# through the Flower Simulation Runtime, then its figure and table.
run: $(STAMP)
	$(BIN)/regtopk-fl -m experiment=fig1_toy runtime=flower hydra.sweep.dir=results/sweeps/make-run
	$(BIN)/regtopk-plot results/sweeps/make-run --out results/fig1_toy/

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# The tests that compare code paths (runtimes, batched and per-worker, resumed
# and uninterrupted, replicas and server) under torch's other CPU kernels:
# ATEN_CPU_CAPABILITY switches them on one machine, as another CPU would
# (README "Which equalities are bitwise"; ~2 x 4 min, not in `make test`).
KERNEL_TESTS := tests/test_runtime_equivalence.py tests/test_hostile_matrix.py \
	tests/test_faults_resume.py tests/test_broadcast.py tests/test_participation.py \
	tests/test_memory.py tests/test_deploy.py tests/test_presets.py tests/test_image_tasks.py \
	tests/test_comeback.py tests/test_attacks.py
test-kernels: $(STAMP)
	for cap in default avx2; do \
		echo "== ATEN_CPU_CAPABILITY=$$cap"; \
		ATEN_CPU_CAPABILITY=$$cap $(BIN)/python -m pytest -q $(KERNEL_TESTS) || exit 1; \
	done

bench: $(STAMP)
	$(BIN)/python scripts/bench_sparsifiers.py

# Deployment Runtime on 127.0.0.1: SuperLink (TLS + node auth) + 3 SuperNodes as
# separate processes, refused nodes, a 20-round run checked against its
# in-process twin, a killed + restarted node, a killed + resumed ServerApp, an impostor
# node (~8 min on 2 quiet cores; not in `make test`,
# where tests/test_deploy.py's loopback test is skipped unless REGTOPK_DEPLOY_TESTS=1).
federation-test: $(STAMP)
	$(BIN)/python scripts/federation_test.py

# The same across a network boundary, as root (scripts/netns_test.py, docs/deploy.md
# "Real networks"): SuperLink and 3 SuperNodes in their own network namespaces on a
# private bridge, TLS for the SuperLink's namespace address, a userspace fault proxy on
# every link; faults (a)-(e), each run against its in-process twin with the same
# missing workers; every namespace, process and temp file removed (prints one
# "skipped" line when not root or without `ip`; results/netns.md has its wall time).
netns-test: $(STAMP)
	$(BIN)/python scripts/netns_test.py

# runtime=flower attached to a real two-node Ray cluster on 127.0.0.1 (head + worker,
# scripts/cluster_test.py, docs/ray-cluster.md): clients run on both nodes and the
# result equals a local-Ray run bit for bit (~1 min; not in `make test`).
cluster-test: $(STAMP)
	$(BIN)/python scripts/cluster_test.py

# Sweeps beyond one machine (scripts/launcher_test.py, docs/sweep-launchers.md): an
# 8-job sweep through hydra/launcher=ray on a two-node Ray cluster on 127.0.0.1
# (jobs on both nodes, every result back in the sweep directory, each equal to the
# basic launcher's) and through hydra/launcher=submitit_local (~3 min; not in
# `make test`). hydra-ray-launcher and the cloudpickle it pins go into
# .venv-ray-launcher, beside the venv, so the venv's joblib keeps its cloudpickle.
RAYL := .venv-ray-launcher
$(RAYL)/.installed: pyproject.toml
	$(BIN)/python -m pip install -q --no-deps --target $(RAYL) hydra-ray-launcher==1.2.2 cloudpickle==2.2.1
	touch $@

launcher-test: $(STAMP) $(RAYL)/.installed
	PYTHONPATH=$(RAYL) $(BIN)/python scripts/launcher_test.py

# What the GPU checks (scripts/gpu_checks.sh) need on a lent GPU machine that has
# torch but neither Flower nor Ray and no internet, under .gpu/ (git-ignored; carry
# it): the cp312 wheels it lacks, unpacked and packed as one .tar.xz without Ray's
# jars and the Ray libraries the Flower simulation never imports, and a reduced
# CIFAR-10 archive (scripts/gpu_bundle.py prints the sizes; ~10 min on 2 cores, most
# of it xz; downloads ~240 MB of wheels once, kept in .gpu/wheels with --keep-wheels).
gpu-bundle: $(STAMP)
	$(BIN)/python scripts/gpu_bundle.py --out .gpu

# scripts/gpu_checks.sh on the CPU with tiny settings: every step (flower_mps
# says "not run": no MPS on a CPU machine) and both runtimes, on synthetic
# CIFAR-shaped JPEGs (a few minutes: four Ray starts); 3 workers, so that Fig. 3's
# unequal shares of 1000 images all fill a batch of 20 and the batched gradients run.
GPU_SMOKE := /tmp/regtopk-gpu-smoke
gpu-smoke: $(STAMP)
	rm -rf $(GPU_SMOKE) && mkdir -p $(GPU_SMOKE)
	$(BIN)/python scripts/gpu_data.py synthetic $(GPU_SMOKE)/data.tar.gz --train 100 --test 10
	OUT=$(GPU_SMOKE)/out RUNS=$(GPU_SMOKE)/runs PY=$(BIN)/python DEVICE=cpu ROUNDS=2 \
	BUDGET_S=900 BUNDLE=$(GPU_SMOKE)/none DATA=$(GPU_SMOKE)/data.tar.gz \
	GPU_BENCH_ARGS="--width 4 --workers 3 --sparsifiers topk --reps 2 --many-n 4 --many-m 2 \
	--many-width 4 --many-rounds 2 --test-subset 20 --cache $(GPU_SMOKE)/cache" \
	bash scripts/gpu_checks.sh
	$(BIN)/python -c "import json, sys; r = json.load(open('$(GPU_SMOKE)/out/gpu_summary.json')); \
	no_mps = 'no CUDA MPS here' in r['flower_mps'].get('skipped', ''); \
	bad = [k for k, v in r.items() if 'error' in v or 'stopped' in v or ('skipped' in v and not no_mps)]; \
	bad += [] if r['inprocess']['floor']['equal_batches'] else ['batched path not taken']; \
	bad += [] if 'topk-graph-det' in r['inprocess']['runs'] else ['no recorded-step run']; \
	bad += [] if r['flower'].get('tick') and r['many'].get('tick_s_per_round') else ['no tick twin']; \
	sys.exit(f'gpu-smoke: steps failed or skipped: {bad}' if bad or len(r) != 5 else 0)"

clean:
	rm -rf results/runs results/sweeps
