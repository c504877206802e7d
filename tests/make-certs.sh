#!/usr/bin/env bash
# Throwaway PKI for the scripts that drive real software: a CA and one leaf certificate (ECDSA
# P-256) for the given DNS names. Writes DIR/ca.pem, DIR/cert.pem, DIR/key.pem.
# tests/make-certs.sh DIR NAME [NAME...]
set -euo pipefail
dir=$1; shift
san=$(printf 'DNS:%s,' "$@"); san=${san%,}
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=sniplex test CA" \
    -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$1" \
    -keyout "$dir/key.pem" -out "$dir/req.pem" 2>/dev/null
printf 'subjectAltName=%s\n' "$san" > "$dir/ext.cnf"
openssl x509 -req -in "$dir/req.pem" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial -days 2 \
    -extfile "$dir/ext.cnf" -out "$dir/cert.pem" 2>/dev/null
