#!/bin/sh
# Re-sign the shipped protocol library (protocols/library/*.toml) with the pbmd
# TEST key. NOT FOR CLINICAL USE: a clinic signs the protocols it installs with
# its own key, kept off this repository, and lists only that key as trusted.
#
#   tests/keys/sign-library.sh [FILE.toml ...]     (default: every library file)
#
# Each FILE.toml gets FILE.toml.minisig (minisign's default prehashed "ED"
# signature); the trusted comment names the protocol, its version and the test key.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
key="$here/test-protocol-signing.key"
[ "$#" -gt 0 ] || set -- "$root"/protocols/library/*.toml
for file in "$@"; do
    # the file's own id and version: TOML puts top-level keys before any table, so the
    # first match is the protocol's (a v2 file's [[phases]] have ids of their own)
    id=$(sed -n 's/^id = "\(.*\)"$/\1/p' "$file" | head -n 1)
    version=$(sed -n 's/^version = \([0-9]*\)$/\1/p' "$file" | head -n 1)
    minisign -S -s "$key" -m "$file" \
        -c "pbmd TEST signature - NOT FOR CLINICAL USE" \
        -t "pbmd protocol $id v$version - signed with the pbmd TEST key, NOT FOR CLINICAL USE"
done
minisign -V -q -p "$root/protocols/library/test-key.pub" -m "$1" >/dev/null
echo "signed $# file(s) with the TEST key"
