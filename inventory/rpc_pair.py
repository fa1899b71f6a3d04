"""Two hosts, one model: gemma4 on an RTX 4090 with part of its layers on a second host's RTX 3090, through
llama.cpp's RPC server (``ggml-rpc-server``).

``bigbox`` runs llama-server; ``helper`` lends its GPU 0 with an RpcServer that listens on its LAN address
and admits bigbox only (ggml-rpc-server has no authentication: ``allow_from`` names the client, never
``'any'``). Both build the same llama.cpp commit (a mismatch aborts the connection), both with GGML_RPC
(the box turns it on). The split is the spec's: ``tensor_split`` gives the RPC device's share first, then
the local GPU's, and ``fit='off'`` keeps llama.cpp from moving layers off it.

    gpubox check inventory/rpc_pair.py
    gpubox plan inventory/rpc_pair.py          # helper's GPU 0 holds bigbox's share
    pyinfra inventory/rpc_pair.py deploys/danarch4090.py   # helper's RPC server first, then gemma4
"""

from gpubox import Box, ExpectedGpu, LlamaCppBuild, LlamaServer, ModelFile, RpcRef, RpcServer

LLAMA_CPP_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
BIGBOX_ADDRESS = "192.168.1.20"
HELPER_ADDRESS = "192.168.1.21"

gemma4 = LlamaServer(
    name="gemma4",
    gpus=(0,),
    model=ModelFile(
        path="/srv/models/gemma-4-12b-it-qat-q4_0.gguf",
        sha256="0" * 64,  # `sha256sum` of your copy
        architecture="gemma4",
    ),
    rpc=(RpcRef(host="helper", service="rpc-gpu0"),),
    tensor_split=(1.0, 1.0),  # helper's 3090 first (RPC devices come first), then this host's 4090
    fit="off",
    n_gpu_layers="all",
    ctx_size=65536,
    cache_type_k="q8_0",
    cache_type_v="q8_0",
    flash_attn="on",
    parallel=1,
    api_key_file="generate",
)

hosts = [
    (
        "bigbox",
        {
            "ssh_hostname": BIGBOX_ADDRESS,
            "box": Box(
                llama_cpp=LlamaCppBuild(commit=LLAMA_CPP_COMMIT, cuda="on"),
                address=BIGBOX_ADDRESS,
                services=(gemma4,),
                expected_gpus=(ExpectedGpu(index=0, name="NVIDIA GeForce RTX 4090", memory_total_mib=24564),),
            ),
        },
    ),
    (
        "helper",
        {
            "ssh_hostname": HELPER_ADDRESS,
            "box": Box(
                llama_cpp=LlamaCppBuild(commit=LLAMA_CPP_COMMIT, cuda="on"),
                address=HELPER_ADDRESS,
                services=(
                    RpcServer(name="rpc-gpu0", gpus=(0,), host=HELPER_ADDRESS, allow_from=(f"{BIGBOX_ADDRESS}/32",)),
                ),
                expected_gpus=(ExpectedGpu(index=0, name="NVIDIA GeForce RTX 3090", memory_total_mib=24576),),
            ),
        },
    ),
]
