"""A fleet with one endpoint: a gateway host in front of two hosts that serve one model.

``gw`` runs only HAProxy (``gateway=``, no box); ``node1`` and ``node2`` each run a llama-server with the same
model file (one sha256), listening on their LAN address with a key and ``allow_from`` admitting the gateway.
Clients call ``http://192.168.1.10:8000/v1/chat/completions`` with ``"model": "gemma4"`` (or
``/gemma4/v1/...`` for any body size) and the gateway's own key. ``min_healthy=1``: ``gpubox rollout`` drains one
node at a time while the other serves.

    gpubox check inventory/fleet.py
    pyinfra inventory/fleet.py deploys/danarch4090.py     # both nodes, then the gateway
"""

from gpubox import BackendRef, Box, ExpectedGpu, Gateway, LlamaCppBuild, LlamaServer, ModelFile, ModelGroup

LLAMA_CPP_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
GATEWAY_ADDRESS = "192.168.1.10"
NODES = {"node1": "192.168.1.11", "node2": "192.168.1.12"}

MODEL = ModelFile(
    path="/srv/models/gemma-4-12b-it-qat-q4_0.gguf",
    sha256="0" * 64,  # `sha256sum` of your copy
    architecture="gemma4",
)


def node(address: str) -> Box:
    return Box(
        llama_cpp=LlamaCppBuild(commit=LLAMA_CPP_COMMIT, cuda="on"),
        address=address,
        services=(
            LlamaServer(
                name="gemma4", gpus=(0,), model=MODEL, ctx_size=32768, parallel=2, flash_attn="on",
                host=address, api_key_file="generate", allow_from=(f"{GATEWAY_ADDRESS}/32",),
            ),
        ),
        expected_gpus=(ExpectedGpu(index=0, name="NVIDIA GeForce RTX 4090", memory_total_mib=24564),),
    )


hosts = [
    (
        "gw",
        {
            "ssh_hostname": GATEWAY_ADDRESS,
            "gateway": Gateway(
                address=GATEWAY_ADDRESS,
                host="0.0.0.0",
                port=8000,
                allow_from=("192.168.1.0/24",),
                api_key_file="generate",
                groups=(
                    ModelGroup(
                        name="gemma4",
                        backends=tuple(BackendRef(host=name, service="gemma4") for name in NODES),
                        min_healthy=1,
                    ),
                ),
            ),
        },
    ),
    *((name, {"ssh_hostname": address, "box": node(address)}) for name, address in NODES.items()),
]
