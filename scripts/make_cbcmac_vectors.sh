#!/usr/bin/env bash
# Regenerate tests/vectors/cbcmac_des.json and tests/vectors/des_cbc.json.
#
# Every value comes from the OpenSSL command line; padding is applied here
# with shell string operations on hex, never with the iscl Python code, so
# the files are an independent check of iscl_hw/crypto.py.
#
# CBC-MAC: ISO/IEC 9797-1 MAC algorithm 1 with output transformation 1, i.e.
# DES-CBC of the padded message and the last 8-byte ciphertext block.
#
# Usage: scripts/make_cbcmac_vectors.sh [output-directory]
# Needs: bash, openssl 3 with the legacy provider, xxd.
set -euo pipefail

out_dir=${1:-"$(cd "$(dirname "$0")/.." && pwd)/tests/vectors"}

# 100 fixed bytes of ASCII; the messages are its prefixes.
base_hex=$(printf '%s' \
    "Now is the time for all good men to come to the aid of the party. " \
    "The quick brown fox jumps over it." | xxd -p | tr -d '\n')
if [ "${#base_hex}" -ne 200 ]; then
    echo "base message is not 100 bytes" >&2
    exit 1
fi

mac_keys=(0123456789abcdef 133457799bbcdff1 fedcba9876543210)
mac_lengths=(0 1 7 8 9 15 16 17 100)
# Binary messages whose last bytes look like padding.
extra_messages=(00 0000000000000000 0102030405060780 01020304050607 80)

# des_cbc KEY IV HEX -> ciphertext hex (input must be block aligned)
des_cbc() {
    printf '%s' "$3" | xxd -r -p |
        openssl enc -des-cbc -nopad -K "$1" -iv "$2" \
            -provider legacy -provider default |
        xxd -p | tr -d '\n'
}

# ISO/IEC 9797-1 padding method 1: zeros to a block multiple, one zero
# block for the empty message, nothing for an aligned one.
pad_m1() {
    local h=$1
    if [ -z "$h" ]; then
        h=0000000000000000
    fi
    while [ $((${#h} % 16)) -ne 0 ]; do h+=00; done
    printf '%s' "$h"
}

# ISO/IEC 9797-1 padding method 2: 0x80, then zeros to a block multiple.
pad_m2() {
    local h=${1}80
    while [ $((${#h} % 16)) -ne 0 ]; do h+=00; done
    printf '%s' "$h"
}

last_block() {
    printf '%s' "${1: -16}"
}

# mac_entry KEY IV MESSAGE_HEX SEPARATOR
mac_entry() {
    local m1 m2
    m1=$(last_block "$(des_cbc "$1" "$2" "$(pad_m1 "$3")")")
    m2=$(last_block "$(des_cbc "$1" "$2" "$(pad_m2 "$3")")")
    printf '    {"key": "%s", "iv": "%s", "message": "%s",\n' "$1" "$2" "$3"
    printf '     "mac_m1": "%s", "mac_m2": "%s"}%s\n' "$m1" "$m2" "$4"
}

write_cbcmac() {
    local zero_iv=0000000000000000 key n
    printf '{\n  "algorithm": "ISO/IEC 9797-1 MAC algorithm 1, DES, output '
    printf 'transformation 1, 64-bit MAC",\n'
    printf '  "generator": "scripts/make_cbcmac_vectors.sh (%s)",\n' \
        "$(openssl version | cut -d' ' -f1-2)"
    printf '  "vectors": [\n'
    for key in "${mac_keys[@]}"; do
        for n in "${mac_lengths[@]}"; do
            mac_entry "$key" "$zero_iv" "${base_hex:0:$((n * 2))}" ,
        done
        for m in "${extra_messages[@]}"; do
            mac_entry "$key" "$zero_iv" "$m" ,
        done
    done
    # Non-zero IV: "7654321 Now is the time for " and its NUL (29 bytes).
    mac_entry 0123456789abcdef fedcba9876543210 \
        "$(printf '7654321 Now is the time for ' | xxd -p | tr -d '\n')00" ""
    printf '  ]\n}\n'
}

write_des_cbc() {
    local keys=(0123456789abcdef 3b3898371520f75e)
    local ivs=(1234567890abcdef a0b1c2d3e4f50617)
    local lengths=(0 8 16 24 40 64 96)
    local i n sep pt ct count=0 total=$((${#keys[@]} * ${#lengths[@]}))
    printf '{\n  "algorithm": "DES-CBC (FIPS 81), no padding",\n'
    printf '  "generator": "scripts/make_cbcmac_vectors.sh (%s)",\n' \
        "$(openssl version | cut -d' ' -f1-2)"
    printf '  "vectors": [\n'
    for i in "${!keys[@]}"; do
        for n in "${lengths[@]}"; do
            count=$((count + 1))
            sep=,
            if [ "$count" -eq "$total" ]; then sep=""; fi
            pt=${base_hex:0:$((n * 2))}
            ct=$(des_cbc "${keys[$i]}" "${ivs[$i]}" "$pt")
            printf '    {"key": "%s", "iv": "%s",\n' "${keys[$i]}" "${ivs[$i]}"
            printf '     "plaintext": "%s",\n' "$pt"
            printf '     "ciphertext": "%s"}%s\n' "$ct" "$sep"
        done
    done
    printf '  ]\n}\n'
}

write_cbcmac >"$out_dir/cbcmac_des.json"
write_des_cbc >"$out_dir/des_cbc.json"
echo "wrote $out_dir/cbcmac_des.json and $out_dir/des_cbc.json"
