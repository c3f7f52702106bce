"""Checks of a parsed spec that need no role planning: metadata, the role set and other
cross-field rules the CRD's CEL also enforces (for runs without an API server), the model
against the runtime line, quantities. Each appends Problems; none raises."""

from __future__ import annotations

from ascend_runtime.roles import PD_ROLES, Role

from ..api.crd import MAX_NAME_LENGTH
from ..api.spec import ModelDeploymentSpec
from .architectures import Architecture
from .capabilities import RuntimeCapabilities
from .problems import Problem
from .quantity import parse_quantity


def check_metadata(name: str, problems: list[Problem]) -> None:
    if len(name) > MAX_NAME_LENGTH:
        problems.append(
            Problem(
                "metadata.name",
                f"{name!r} has {len(name)} characters; child names would pass Kubernetes' "
                "63-character limit",
                f"use a name of at most {MAX_NAME_LENGTH} characters",
            )
        )
    if not name.replace("-", "a").isalnum() or not name[0].isalnum() or name != name.lower():
        problems.append(
            Problem(
                "metadata.name",
                f"{name!r} is not a DNS label",
                "use lowercase letters, digits and '-', starting and ending with a letter or digit",
            )
        )


def check_structure(spec: ModelDeploymentSpec, problems: list[Problem]) -> None:
    """The cross-field rules the CRD's CEL also enforces (for runs without an API server)."""
    source = spec.model.source
    set_sources = [
        n
        for n, v in (
            ("pvc", source.pvc),
            ("hostPath", source.host_path),
            ("huggingFace", source.hugging_face),
        )
        if v is not None
    ]
    if len(set_sources) != 1:
        problems.append(
            Problem(
                "spec.model.source",
                "no model source is set"
                if not set_sources
                else f"{len(set_sources)} sources are set ({', '.join(set_sources)})",
                "set exactly one of pvc, hostPath or huggingFace",
            )
        )
    hf = source.hugging_face
    if hf is not None and (hf.cache.claim_name is None) == (hf.cache.host_path is None):
        problems.append(
            Problem(
                "spec.model.source.huggingFace.cache",
                "the cache needs exactly one of claimName or hostPath",
                "set claimName (a PVC with the HF cache) or hostPath (a node directory)",
            )
        )
    names_ = [r.name for r in spec.roles]
    if len(set(names_)) != len(names_):
        problems.append(Problem("spec.roles", f"roles repeat: {names_}", "list each role once"))
    elif Role.UNIFIED in names_ and len(names_) > 1:
        problems.append(
            Problem(
                "spec.roles",
                f"unified is combined with {[n for n in names_ if n != Role.UNIFIED]}",
                "use one unified role, or a prefill and a decode role",
            )
        )
    elif Role.UNIFIED not in names_ and set(names_) != set(PD_ROLES):
        missing = sorted(set(PD_ROLES) - set(names_))
        problems.append(
            Problem(
                "spec.roles",
                f"PD disaggregation needs both prefill and decode; {missing} is missing",
                "add the missing role, or use one unified role",
            )
        )
    by_name = {r.name: (i, r) for i, r in enumerate(spec.roles)}
    for i, role in enumerate(spec.roles):
        if role.name != Role.PREFILL and role.replicas is not None:
            problems.append(
                Problem(
                    f"spec.roles[{i}].replicas",
                    f"replicas is set on the {role.name} role",
                    "set the unified or decode instance count in spec.replicas (what kubectl "
                    "scale changes); roles[].replicas is for prefill only",
                )
            )
    if Role.PREFILL in by_name and Role.DECODE in by_name:
        pi, prefill = by_name[Role.PREFILL]
        _, decode = by_name[Role.DECODE]
        if prefill.parallelism.tensor < decode.parallelism.tensor:
            problems.append(
                Problem(
                    f"spec.roles[{pi}].parallelism.tensor",
                    f"prefill tensor {prefill.parallelism.tensor} is below decode tensor "
                    f"{decode.parallelism.tensor}; Mooncake needs prefill TP >= decode TP",
                    f"raise prefill tensor to at least {decode.parallelism.tensor}, or lower "
                    "decode tensor",
                )
            )
    if spec.runtime.engine == "vllm" and spec.hardware is None:
        problems.append(
            Problem(
                "spec.hardware",
                "engine vllm needs NPU nodes, and spec.hardware is not set",
                "set spec.hardware.profile (A2 or A3), or use spec.runtime.engine: sim",
            )
        )
    if spec.model.task == "embed":
        _check_embed(spec, problems)


def _check_embed(spec: ModelDeploymentSpec, problems: list[Problem]) -> None:
    """An embedding model only encodes: no prefill/decode split, no drafting, no decode
    graphs, no KV reuse across requests."""
    for i, role in enumerate(spec.roles):
        if role.name != Role.UNIFIED:
            problems.append(
                Problem(
                    f"spec.roles[{i}].name",
                    f"task: embed has no {role.name} role: an embedding model only runs "
                    "prefill-like encoder passes, so prefill/decode disaggregation does not apply",
                    "use one role named unified",
                )
            )
    runtime = spec.runtime
    if runtime.speculative is not None:
        problems.append(
            Problem(
                "spec.runtime.speculative",
                "speculative decoding (MTP) drafts output tokens, and an embedding model "
                "generates none",
                "remove spec.runtime.speculative",
            )
        )
    if runtime.kv_offload is not None:
        problems.append(
            Problem(
                "spec.runtime.kvOffload",
                "KV offload keeps KV blocks for later requests; an embedding pass keeps none",
                "remove spec.runtime.kvOffload",
            )
        )
    limit = spec.model.max_model_len
    for i, role in enumerate(spec.roles):
        budget = role.max_num_batched_tokens or runtime.max_num_batched_tokens
        if limit and budget and budget < limit:
            field_path = (
                f"spec.roles[{i}].maxNumBatchedTokens"
                if role.max_num_batched_tokens
                else "spec.runtime.maxNumBatchedTokens"
            )
            problems.append(
                Problem(
                    field_path,
                    f"{budget} tokens per batch is below maxModelLen {limit}: an embedding "
                    "input is encoded in one pass (no chunked prefill), so a full-length input "
                    "could never be scheduled",
                    f"raise it to at least {limit}, or lower spec.model.maxModelLen",
                )
            )
    modes = {role.graph_mode or runtime.graph_mode for role in spec.roles}
    full = {
        role.cudagraph_mode or runtime.cudagraph_mode
        for role in spec.roles
        if (role.graph_mode or runtime.graph_mode) == "aclgraph"
    } - {"PIECEWISE"}
    if full:
        problems.append(
            Problem(
                "spec.runtime.cudagraphMode",
                f"{', '.join(sorted(full))} captures decode batches, and an embedding model "
                "never decodes",
                "set spec.runtime.cudagraphMode: PIECEWISE (graphs over encoder batch token "
                "counts), or graphMode: eager",
            )
        )
    if "torchair" in modes:
        problems.append(
            Problem(
                "spec.runtime.graphMode",
                "TorchAir graph mode covers decoder models only",
                "use graphMode aclgraph with cudagraphMode PIECEWISE, or eager",
            )
        )


def check_model(
    spec: ModelDeploymentSpec,
    arch: Architecture,
    caps: RuntimeCapabilities,
    problems: list[Problem],
) -> None:
    model, runtime = spec.model, spec.runtime
    preset = model.architecture.preset
    if preset is not None:
        from .architectures import PRESETS

        if preset not in PRESETS:
            problems.append(
                Problem(
                    "spec.model.architecture.preset",
                    f"unknown preset {preset!r}",
                    f"use one of {sorted(PRESETS)}, or leave preset out and set the fields",
                )
            )
    rope = model.rope_scaling
    if rope is not None and model.max_model_len:
        limit = int(rope.factor * rope.original_max_position_embeddings)
        if model.max_model_len > limit:
            problems.append(
                Problem(
                    "spec.model.maxModelLen",
                    f"{model.max_model_len} exceeds what rope scaling reaches: factor "
                    f"{rope.factor:g} x {rope.original_max_position_embeddings} = {limit}",
                    f"lower maxModelLen to {limit} or raise ropeScaling.factor",
                )
            )
    spec_dec = runtime.speculative
    if spec_dec is not None:
        _check_draft(spec, problems)
        if spec_dec.method == "mtp" and arch.mtp_layers == 0:
            problems.append(
                Problem(
                    "spec.runtime.speculative",
                    "MTP needs weights with MTP layers, and the model's architecture has none",
                    "use method eagle3 with a draft model, or set architecture.mtpLayers if "
                    "the weights do carry MTP layers",
                )
            )
        # the runtime's own setting (as the CRD's rule reads it), or any role's override
        roles = spec.roles
        full = any(
            (graph or runtime.graph_mode) == "aclgraph"
            and (mode or runtime.cudagraph_mode) != "PIECEWISE"
            for graph, mode in [(None, None), *((r.graph_mode, r.cudagraph_mode) for r in roles)]
        )
        if spec_dec.disable_padded_drafter_batch and (full or runtime.async_scheduling):
            problems.append(
                Problem(
                    "spec.runtime.speculative.disablePaddedDrafterBatch",
                    "an unpadded drafter batch is rejected with full graphs and with async "
                    "scheduling",
                    "set disablePaddedDrafterBatch: false, or use asyncScheduling: false with "
                    "graphMode eager or cudagraphMode PIECEWISE",
                )
            )
        n1 = spec_dec.num_speculative_tokens + 1
        if runtime.capture_sizes and n1 > 2 and full:
            bad = [s for s in runtime.capture_sizes if s % n1]
            if bad:
                problems.append(
                    Problem(
                        "spec.runtime.captureSizes",
                        f"with full graphs and {n1 - 1} speculative tokens every capture size must "
                        f"be a multiple of {n1}; {bad} are not",
                        f"use multiples of {n1} (e.g. {[n1 * k for k in (1, 2, 4, 8)]}), or leave "
                        "captureSizes out to get them planned",
                    )
                )
    if runtime.fused_mc2 and not caps.fused_mc2:
        problems.append(
            Problem(
                "spec.runtime.fusedMc2",
                f"fused MC2 is not available in vllm-ascend {caps.line}",
                "set fusedMc2: false, or run v0.13.x or later",
            )
        )
    if runtime.kv_offload is not None and not caps.kv_offload:
        problems.append(
            Problem(
                "spec.runtime.kvOffload",
                f"KV offload with cpu_bytes_to_use needs vLLM 0.23 (vllm-ascend v0.23); this is "
                f"{caps.line}",
                "remove kvOffload, or use spec.runtime.version v0.23.x",
            )
        )


def check_quantities(spec: ModelDeploymentSpec, problems: list[Problem]) -> None:
    checks: list[tuple[str, str]] = []
    if spec.hardware is not None:
        checks.append(("spec.hardware.shmSize", spec.hardware.shm_size))
    if spec.runtime.kv_offload is not None:
        checks.append(("spec.runtime.kvOffload.cpuBytes", spec.runtime.kv_offload.cpu_bytes))
    for i, role in enumerate(spec.roles):
        if role.resources:
            for kind in ("requests", "limits"):
                for key, value in getattr(role.resources, kind).items():
                    checks.append((f"spec.roles[{i}].resources.{kind}.{key}", value))
    if spec.router.resources:
        for kind in ("requests", "limits"):
            for key, value in getattr(spec.router.resources, kind).items():
                checks.append((f"spec.router.resources.{kind}.{key}", value))
    for path, value in checks:
        try:
            parse_quantity(value)
        except ValueError as exc:
            problems.append(Problem(path, str(exc), "write a quantity such as 64Gi, 500m or 8"))


def check_env(spec: ModelDeploymentSpec, problems: list[Problem]) -> None:
    """A name both removed and set is a contradiction the user must resolve."""
    levels = [("spec.runtime", spec.runtime.env, spec.runtime.unset_env)]
    levels += [(f"spec.roles[{i}]", r.env, r.unset_env) for i, r in enumerate(spec.roles)]
    for path, env, unset in levels:
        for name in sorted(set(env) & set(unset)):
            problems.append(
                Problem(
                    f"{path}.unsetEnv",
                    f"{name} is removed here and set in {path}.env",
                    "keep it in only one of env and unsetEnv",
                )
            )


def check_heads(spec: ModelDeploymentSpec, arch: Architecture, problems: list[Problem]) -> None:
    """vLLM splits attention heads over tensor-parallel ranks: TP must divide the query heads,
    and the KV heads must divide TP (each replicated) or be divisible by it. Otherwise every
    engine pod exits at start."""
    heads, kv = arch.num_attention_heads, None if arch.mla else arch.num_kv_heads
    for i, role in enumerate(spec.roles):
        tp = role.parallelism.tensor
        path = f"spec.roles[{i}].parallelism.tensor"
        fits = [d for d in range(1, 65) if _tp_fits(d, heads, kv)]
        if heads and heads % tp:
            problems.append(
                Problem(
                    path,
                    f"tensor {tp} does not divide the model's {heads} attention heads (vLLM "
                    "refuses to start)",
                    f"use a tensor size among {fits}",
                )
            )
        elif kv and (tp % kv if tp >= kv else kv % tp):
            problems.append(
                Problem(
                    path,
                    f"tensor {tp} and the model's {kv} KV heads: vLLM needs one to divide the "
                    "other (KV heads split over ranks, or each replicated)",
                    f"use a tensor size among {fits}",
                )
            )


def _tp_fits(tp: int, heads: int | None, kv: int | None) -> bool:
    if heads and heads % tp:
        return False
    return not kv or not (tp % kv if tp >= kv else kv % tp)


def _check_draft(spec: ModelDeploymentSpec, problems: list[Problem]) -> None:
    """An Eagle3 draft model is named, and named the way the model source can reach it."""
    spec_dec = spec.runtime.speculative
    assert spec_dec is not None
    path = "spec.runtime.speculative.draftModel"
    draft = spec_dec.draft_model
    if (spec_dec.method == "eagle3") != (draft is not None):
        problems.append(
            Problem(
                path,
                "method eagle3 needs draftModel" if draft is None else "method mtp takes no draft",
                "name the Eagle3 draft weights in draftModel"
                if draft is None
                else "remove draftModel, or set method: eagle3",
            )
        )
        return
    if draft is None:
        return
    if spec.model.source.hugging_face is not None:
        if draft.count("/") != 1 or draft.startswith("."):
            problems.append(
                Problem(path, f"{draft!r} is not a Hugging Face id", "write it as owner/name")
            )
    elif ".." in draft.split("/"):
        problems.append(
            Problem(
                path,
                f"{draft!r} leaves the model volume",
                "give a path inside the volume, relative to its root",
            )
        )
