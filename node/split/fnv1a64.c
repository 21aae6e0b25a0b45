/* FNV-1a, 64 bits: the hash llama.cpp's RPC backend names its weight cache files by (ggml-rpc.cpp's
 * fnv_hash). Built by install.sh into <venv>/libexec/pinkybrain/libfnv1a64.so; node/split/rpc_cache.py
 * calls it through ctypes, since hashing a model's gigabytes byte by byte in Python takes minutes. */
#include <stddef.h>
#include <stdint.h>

uint64_t pinkybrain_fnv1a64(const uint8_t *data, size_t len, uint64_t hash) {
    for (size_t i = 0; i < len; i++) {
        hash ^= data[i];
        hash *= 0x100000001b3ULL;
    }
    return hash;
}
