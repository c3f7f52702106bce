"""One invalid ModelDeployment per CEL rule of the CRD (each breaks exactly that rule), shared by
the cel-python unit tests and the real-API-server tests."""

from __future__ import annotations

from helpers import manifest, pd_roles

CEL_CASES = {
    "no-source": manifest(model={"source": {"pvc": None}}),
    "two-sources": manifest(model={"source": {"hostPath": {"path": "/m"}}}),
    "prefill-only": manifest(roles=[pd_roles()[0]]),
    "unified-plus-decode": manifest(roles=[{"name": "unified"}, pd_roles()[1]]),
    "pd-tp": manifest(roles=pd_roles(prefill={"parallelism": {"tensor": 2}})),
    "pcp-pp": manifest(
        runtime={"version": "v0.13.0"},
        roles=[
            {"name": "unified", "parallelism": {"tensor": 2, "pipeline": 2, "prefillContext": 2}}
        ],
    ),
    "dcp-not-dividing": manifest(
        roles=[{"name": "unified", "parallelism": {"tensor": 4, "decodeContext": 3}}]
    ),
    "datalocal-not-dividing": manifest(
        roles=[{"name": "unified", "parallelism": {"tensor": 2, "data": 3, "dataLocal": 2}}]
    ),
    "decode-replicas": manifest(roles=pd_roles(decode={"replicas": 3})),
    "capture-multiples": manifest(
        model={"architecture": {"preset": "deepseek-v3"}},
        runtime={"speculative": {"numSpeculativeTokens": 3}, "captureSizes": [4, 6]},
    ),
    "hf-cache-both": manifest(
        model={
            "source": {
                "pvc": None,
                "huggingFace": {
                    "id": "Qwen/Qwen3-8B",
                    "cache": {"claimName": "hf", "hostPath": "/data/hf"},
                },
            }
        }
    ),
    "vllm-without-hardware": manifest(hardware=None),
    "padded-drafter": manifest(
        model={"architecture": {"preset": "deepseek-v3"}},
        runtime={"speculative": {"numSpeculativeTokens": 1, "disablePaddedDrafterBatch": True}},
    ),
    "eagle3-without-draft": manifest(
        runtime={"speculative": {"method": "eagle3", "numSpeculativeTokens": 3}}
    ),
    "kv-aware-settings-alone": manifest(router={"kvAware": {"mode": "approximate"}}),
}

LONG_NAME = manifest()
LONG_NAME["metadata"]["name"] = "n" * 40
CEL_CASES["long-name"] = LONG_NAME

RULE_OF: dict[str, str] = {
    "no-source": "exactly one model source",
    "two-sources": "exactly one model source",
    "hf-cache-both": "exactly one of claimName or hostPath",
    "prefill-only": "use one unified role, or a prefill and a decode role",
    "unified-plus-decode": "use one unified role, or a prefill and a decode role",
    "pd-tp": "prefill parallelism.tensor must be >= decode",
    "pcp-pp": "pipeline and prefillContext cannot both be above 1",
    "dcp-not-dividing": "decodeContext must divide tensor",
    "datalocal-not-dividing": "dataLocal must divide data",
    "decode-replicas": "replicas is for the prefill role only",
    "capture-multiples": "multiples of numSpeculativeTokens + 1",
    "vllm-without-hardware": "spec.hardware is required with engine vllm",
    "padded-drafter": "disablePaddedDrafterBatch needs asyncScheduling: false",
    "long-name": "metadata.name must be at most 39 characters",
    "eagle3-without-draft": "method eagle3 needs draftModel",
    "kv-aware-settings-alone": "kvAware applies to policy kv-aware only",
}
"""The message of the one rule each case breaks."""


TYPE_CASES = {
    # YAML that a lax parser would coerce: the API server refuses each, and so must the planner
    "bool-as-int": (manifest(runtime={"maxNumSeqs": True}), "spec.runtime.maxNumSeqs"),
    "string-as-int": (
        manifest(roles=[{"name": "unified", "parallelism": {"tensor": "8"}}]),
        "spec.roles[0].parallelism.tensor",
    ),
    "int-as-string": (manifest(runtime={"env": {"OMP_NUM_THREADS": 1}}), "spec.runtime.env"),
    "string-as-bool": (manifest(model={"trustRemoteCode": "yes"}), "spec.model.trustRemoteCode"),
}
"""Values of the wrong type -> the field path both the planner and the API server name."""


UPSTREAM_ACCEPTED = {
    # vllm-ascend runs these; the API server and the planner must take them (with warnings)
    "mc2-mtp": manifest(
        model={"architecture": {"preset": "deepseek-v3"}, "quantization": "w8a8"},
        runtime={
            "fusedMc2": True,
            "maxNumBatchedTokens": 1024,
            "speculative": {"numSpeculativeTokens": 1},
        },
    ),
    "mc2-bf16-pd-decode-kernel": manifest(
        runtime={
            "fusedMc2": True,
            "fusedMc2Kernel": "dispatch_gmm_combine_decode",
            "maxNumSeqs": 64,
            "maxNumBatchedTokens": 8192,
        },
        roles=pd_roles({"kvPort": 30000}, {"kvPort": 30100}),
    ),
}
"""Specs shaped like vllm-ascend's own CI deployments, once refused here."""
