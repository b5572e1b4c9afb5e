#!/usr/bin/env bash
# Rebuild every row of the results table (README: The table) end to end:
#   bash reproduce.sh DATASET [--seeds N] [--models LIST] [--ablations 0|1] [--key value ...]
# DATASET: demo (synthetic, offline, a few minutes), beauty, sports, toys, yelp (downloaded or
# made by data_prep.py), or the name of your own dataset under --data_dir (README: Your own
# dataset).
# Data, runs, cache and results/ are written under the current folder; finished runs are
# reused, so an interrupted reproduction resumes where it stopped. Extra --key value pairs
# are bimi.py options (e.g. --device cuda, --data_dir DIR); every option is checked
# before any download or training.
set -euo pipefail
export BIMI_COMMAND="bash reproduce.sh $*"  # the command a table's provenance names
here=$(cd "$(dirname "$0")" && pwd)
usage="usage: bash reproduce.sh demo|beauty|sports|toys|yelp|NAME [--seeds N] [--models LIST]
                          [--ablations 0|1] [--key value ...]
  NAME             your own dataset, DIR/NAME/{sequences.txt,items.jsonl} with --data_dir DIR
  --seeds N        seeds 1..N of every row (default 3; demo 2)
  --models LIST    backbones, comma-separated (default mind,comirec-dr,comirec-sa,remi)
  --ablations 0    leave out the ComiRec-SA ablation rows
  other options: .venv/bin/python bimi.py reproduce --help"
case "${1:-}" in
  "" | -h | --help | help) echo "$usage"; [ -n "${1:-}" ]; exit ;;
  -*) echo "error: the dataset comes first, then options, got '$1'" >&2; echo "$usage" >&2
      exit 2 ;;
  *) dataset=$1; shift ;;
esac
[ "$dataset" = demo ] && name=synthetic || name=$dataset

# dependencies: a virtual environment beside the kit (BIMI_PYTHON picks an existing interpreter)
if [ -n "${BIMI_PYTHON:-}" ]; then
  py=$BIMI_PYTHON
  command -v "$py" > /dev/null || {
    echo "error: BIMI_PYTHON=$py is not a Python interpreter; unset it to use .venv/" >&2; exit 2; }
else
  [ -x "$here/.venv/bin/python" ] || python3 -m venv "$here/.venv"
  "$here/.venv/bin/pip" install -q -r "$here/requirements.txt"
  py=$here/.venv/bin/python
fi

# glibc hands every freed block back to the OS, so each CPU training step page-faults its
# (batch x items) logits in again; keeping freed memory in the process makes a step 10-30 % faster
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-1073741824}
export MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-1073741824}

# the semantic backend: an LLM when an endpoint is configured, else the catalogue's categories
if [ -n "${OPENAI_BASE_URL:-}" ]; then
  echo "LLM backend: $OPENAI_BASE_URL (model names as resolved in each run's config.json)"
  backend=(--backend llm --embedder api)
else
  echo "OPENAI_BASE_URL is not set: the EIMF rows use the categories backend (no LLM)," \
    "labelled so in the table"
  backend=(--backend categories --embedder hash)
fi

# the demo trades seeds and epochs for a run of a few minutes; later options override these
[ "$dataset" = demo ] && defaults=(--seeds 2 --max_epochs 5) || defaults=()
# data/ beside the runs unless --data_dir says otherwise (later options win); bimi.py checks every
# option, then prepares the data if it is missing, then trains
"$py" "$here/bimi.py" reproduce --dataset "$name" --data_dir data "${backend[@]}" \
  "${defaults[@]}" "$@"
