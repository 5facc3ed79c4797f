#!/bin/sh
# The certificate files as swarm secrets, for `make stack-up`:
#
#   deploy/stack-secrets.sh CERTS_DIR SECRET:FILE...
#
# Creates each secret that does not exist from CERTS_DIR/FILE, labelled fn.sha256=<the file's
# SHA-256>. A secret never changes and cannot be read back, so one that exists is kept, and
# compared through that label: when the file is no longer what the secret was made from (a
# node certificate `fn-certs --keep` renewed, a rotation), it says so on stderr, since the
# stack goes on using the secret. A secret without the label (made by hand, or by an older
# `make stack-up`) cannot be compared, and it says that too. Exits non-zero only when a file
# is missing or the engine refuses a secret.
set -eu

readme='README.md, "Across machines: Docker swarm", "Rotating the certificates"'

if [ $# -lt 2 ]; then
  echo "usage: $0 CERTS_DIR SECRET:FILE..." >&2
  exit 2
fi
dir=$1
shift

for pair in "$@"; do
  name=${pair%%:*}
  file=$dir/${pair#*:}
  if [ ! -r "$file" ]; then
    echo "$0: $file is missing or unreadable: make it with fn-certs (make certs) first" >&2
    exit 1
  fi
  sum=$(sha256sum <"$file" | cut -c1-64)
  case $sum in
    *[!0-9a-f]* | "") echo "$0: cannot hash $file (sha256sum failed or is missing)" >&2; exit 1 ;;
  esac
  if ! docker secret inspect "$name" >/dev/null 2>&1; then
    docker secret create --label "fn.sha256=$sum" "$name" "$file" >/dev/null
    echo "created secret $name from $file"
    continue
  fi
  have=$(docker secret inspect --format '{{index .Spec.Labels "fn.sha256"}}' "$name" 2>/dev/null) || have=
  if [ -z "$have" ] || [ "$have" = "<no value>" ]; then
    echo "WARNING: cannot tell whether the swarm secret $name still holds $file: it has no" \
      "fn.sha256 label (made by hand or by an older make stack-up). If $file was renewed or" \
      "rotated, the stack still uses the old one: see $readme." >&2
  elif [ "$have" != "$sum" ]; then
    echo "WARNING: the swarm secret $name is not $file any more ($file was renewed or" \
      "rotated since the secret was made): the stack keeps using the secret's old contents," \
      "and a secret cannot change. Make a new secret from $file and point the stack at it:" \
      "see $readme." >&2
  fi
done
