"""Evaluation protocols: train fresh networks on a (synthetic) set and test them on real data.

One table, ``PROTOCOLS``, used by every entry point (``raydd condense --eval-protocol``,
``raydd evaluate --protocol``, the Python API, sweep specs' ``eval: {protocol: ...}`` and the
benchmarks):

- ``standard`` (``standard.py``): the DC/DSA/DM/MTT protocol: SGD, DSA, hard or soft CE, the
  learned step size of trajectory-matching sets, epochs + 1 passes with lr ×0.1 (fresh optimiser)
  after pass epochs//2 + 1, as DC/MTT's evaluate_synset;
- ``edc`` (``edc.py``): EDC's soft-label protocol: AdamW, small batches, the smoothing LR
  schedule ζ, EMA of the weights, KL on the soft labels at a temperature (optionally relabelled by
  the method's teacher models).

Every protocol reports the mean ± std over networks of the FINAL test accuracy (``EvalResult``).
A protocol is a config dataclass with ``defaults(dataset, **fields)`` and a function
``run(syn, test, config, *, teachers, on_model, on_epoch) -> EvalResult``; adding one is adding a row here.

>>> config = protocol_config("digits", {"protocol": "edc", "epochs": 50})
>>> evaluate(synthetic_set, test, config, teachers=method.teacher_models())
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .edc import EDCEvalConfig, evaluate_edc
from .standard import DEFAULT_LR, EvalConfig, EvalResult, evaluate_synthetic, full_data, train_and_test


def _standard(syn, test, config: EvalConfig, *, teachers=None, on_model=None, on_epoch=None) -> EvalResult:
    return evaluate_synthetic(syn, test, config, on_model=on_model, on_epoch=on_epoch)  # labels as stored


@dataclass(frozen=True)
class Protocol:
    name: str
    config_cls: type
    run: Callable[..., EvalResult]  # (syn, test, config, *, teachers, on_model, on_epoch) -> EvalResult
    summary: str

    @property
    def fields(self) -> set[str]:
        return {f.name for f in dataclasses.fields(self.config_cls)}


PROTOCOLS: dict[str, Protocol] = {
    "standard": Protocol("standard", EvalConfig, _standard,
                         "N fresh networks, SGD momentum 0.9, wd 5e-4, DSA, epochs + 1 passes, lr x0.1 (fresh "
                         "optimiser) after pass epochs//2 + 1, as DC/MTT's evaluate_synset; the learned step size of "
                         "trajectory-matching sets, else 0.01"),
    "edc": Protocol("edc", EDCEvalConfig, evaluate_edc,
                    "EDC's soft-label protocol: AdamW, small batches, smoothing LR schedule zeta, EMA weights, "
                    "KL at a temperature (teachers: relabel with the method's observers)"),
}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"eval protocol {name!r} is invalid: accepted {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def protocol_of(config: Any) -> Protocol:
    """The protocol whose config ``config`` is."""
    for protocol in PROTOCOLS.values():
        if isinstance(config, protocol.config_cls):
            return protocol
    raise ValueError(f"{type(config).__name__} is not an evaluation config: accepted "
                     f"{', '.join(p.config_cls.__name__ for p in PROTOCOLS.values())}")


def protocol_fields(settings: dict | None) -> set[str]:
    """The fields the protocol named by ``settings['protocol']`` (default standard) accepts."""
    return get_protocol((settings or {}).get("protocol", "standard")).fields


def protocol_config(dataset: str, settings: dict | None = None, **overrides: Any):
    """The evaluation config of ``settings`` (``protocol``: a PROTOCOLS name, default standard; the other
    keys its fields) with ``overrides`` applied, starting from the protocol's rows for ``dataset``."""
    settings = {**(settings or {}), **overrides}
    protocol = get_protocol(settings.pop("protocol", "standard"))
    unknown = sorted(set(settings) - protocol.fields)
    for key in unknown:
        owners = [p.name for p in PROTOCOLS.values() if key in p.fields]
        if owners and settings[key] is True:  # a switch of another protocol (teachers: edc's relabelling)
            raise ValueError(f"eval {key}=True is invalid: true only with protocol {owners[0]}, not {protocol.name}")
    if unknown:
        raise ValueError(f"unknown {protocol.name} evaluation setting(s) {unknown}: accepted protocol, "
                         f"{', '.join(sorted(protocol.fields))}")
    return protocol.config_cls.defaults(dataset, **settings)


def evaluate(syn, test, config, *, teachers: Sequence | None = None, on_model=None,
             progress: bool = False) -> EvalResult:
    """Evaluate ``syn`` on the real ``test`` split with ``config``'s protocol.

    ``teachers``: the method's teacher models (``CondensationMethod.teacher_models()``), used by
    protocols whose config asks for them (EDC's ``teachers=True``). ``progress``: a bar over the
    networks' epochs (with rate and ETA) on stderr.
    """
    protocol = protocol_of(config)
    use = teachers if getattr(config, "teachers", False) else None
    if not progress:
        return protocol.run(syn, test, config, teachers=use, on_model=on_model)
    from tqdm.auto import tqdm

    with tqdm(total=config.num_models * config.passes, unit="epoch", leave=False, dynamic_ncols=True,
              desc=f"evaluate ({config.num_models} net{'s' if config.num_models > 1 else ''})") as bar:
        return protocol.run(syn, test, config, teachers=use, on_model=on_model,
                            on_epoch=lambda model, epoch: bar.update(1))


__all__ = ["DEFAULT_LR", "EDCEvalConfig", "EvalConfig", "EvalResult", "PROTOCOLS", "Protocol", "evaluate",
           "evaluate_edc", "evaluate_synthetic", "full_data", "get_protocol", "protocol_config", "protocol_fields",
           "protocol_of", "train_and_test"]
