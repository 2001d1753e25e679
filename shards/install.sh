#!/usr/bin/env bash
# Build the first-catalog shards and install them into a shard directory as
# {id}@{version}.so, root-owned (when run as root), mode 0644.
#   shards/install.sh DEST [--release] [--fixtures]
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:?usage: shards/install.sh DEST [--release] [--fixtures]}"
shift
profile=debug release=() fixtures=()
for a in "$@"; do
  case "$a" in
    --release) profile=release release=(--release) ;;
    --fixtures) fixtures=(--fixtures -p shard-fixture-misbehave -p shard-fixture-qos-misbehave -p shard-fixture-abi-v2) ;;
    *) echo "unknown option $a" >&2; exit 2 ;;
  esac
done
target="${CARGO_TARGET_DIR:-target}"
pkgs=(-p shardline-agent -p shard-vpn-tunnel -p shard-crypto-chacha20poly1305 -p shard-crypto-aes256gcm
      -p shard-auth-psk -p shard-qos-shaper -p shard-qos-dscp)
cargo build "${release[@]}" "${pkgs[@]}" "${fixtures[@]:1}"
"$target/$profile/shardline-agent" shards install "$target/$profile" "$dest" "${fixtures[@]:0:1}"
