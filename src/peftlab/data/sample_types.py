"""Per-record type labels, carried from a column of each record to the batch's ``sample_type``.

LoRAMoE's localized balancing constraint (methods/loramoe.py) ties each group of experts to one type
of data (the paper: world-knowledge vs downstream-task samples), so it needs every sample's type.
With ``peft.type_field=COLUMN`` the pipeline reads that column of every record and maps its value to
a group index: by position in ``peft.type_labels`` (e.g. ``[world, task]``, in the order of
``expert_groups``), or, without names, the value itself must be the index 0..M-1.

    record {"...": ..., COLUMN: "task"}  -> Conversation.extra["sample_type"] = 1   (read_records)
    -> Example.types = (1,)      one per sequence; a packed row lists its sequences' types  (encode_one)
    -> batch["sample_type"]      [B] long for unpacked rows; [B, T] for packed rows, each token its
                                 sequence's type (padding: 0, never counted: it is not a real token)

A record without the column, or with a value that is not a known label, raises ``TypeLabelError``
naming the record, the column, the value and the labels it may take (with ``data.skip_bad_records``
such records are skipped and counted, as other malformed records are). Labels describe supervised
examples: pre-training blocks cut across documents and preference pairs are not routed by type, so
those objectives refuse a type field.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import DataError

KEY = "sample_type"  # in Conversation.extra and in the batch


class TypeLabelError(DataError):
    """A record whose type label (``peft.type_field``) is missing or not one of the known labels."""


@dataclass(frozen=True)
class TypeLabels:
    """Which column holds the type and the values it may take (``names[i]`` is type i)."""

    field: str
    names: tuple[str, ...]  # () : the values are the indices themselves
    groups: int  # M, the number of types

    def allowed(self) -> str:
        return ", ".join(map(repr, self.names)) if self.names else f"the integers 0..{self.groups - 1}"

    def index(self, raw: object, where: str) -> int:
        """The type of one raw record (a dict from the source file)."""
        if not isinstance(raw, dict) or self.field not in raw or raw[self.field] is None:
            raise TypeLabelError(f"{where}: no type label: peft.type_field={self.field!r} names a column this "
                                 f"record does not have; give every record one of {self.allowed()}, or unset "
                                 "peft.type_field (then every sample is of type peft.sample_type)")
        value = raw[self.field]
        if self.names:
            if isinstance(value, str) and value in self.names:
                return self.names.index(value)
        elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value < self.groups:
            return value
        raise TypeLabelError(f"{where}: type label {value!r} in column {self.field!r} is not one of "
                             f"{self.allowed()}" + ("" if self.names else " (name string labels with "
                                                    "peft.type_labels=[...], in the order of peft.expert_groups)"))


def from_method_config(peft_cfg) -> TypeLabels | None:
    """The labels a method config asks the data for (LoRAMoE's ``type_field``/``type_labels``), or None."""
    field = getattr(peft_cfg, "type_field", None)
    if not field:
        return None
    return TypeLabels(str(field), tuple(str(n) for n in getattr(peft_cfg, "type_labels", ()) or ()),
                      len(getattr(peft_cfg, "expert_groups", ())))


def attach(conv, raw: object, where: str, labels: TypeLabels) -> None:
    """Record the type of a parsed record (a Conversation) from its raw source record."""
    if not hasattr(conv, "extra"):
        raise TypeLabelError(f"{where}: peft.type_field={labels.field!r} labels supervised records; this is a "
                             "preference record (prompt/chosen/rejected), which LoRAMoE's constraint does not route")
    conv.extra[KEY] = labels.index(raw, where)


def row_types(examples: list, width: int, packed: bool):
    """``sample_type`` for a collated batch: [B] (unpacked) or [B, T] (packed), or None when no
    example carries types. Every example must carry them when one does."""
    if not any(e.types for e in examples):
        return None
    if not all(e.types for e in examples):
        missing = next(e for e in examples if not e.types)
        raise TypeLabelError(f"{missing.source}: this example has no type label while others in its batch do")
    if not packed:
        return torch.tensor([e.types[0] for e in examples], dtype=torch.long)
    out = torch.zeros(len(examples), width, dtype=torch.long)
    for i, e in enumerate(examples):
        lens = e.seq_lens or (len(e),)
        per_token = torch.repeat_interleave(torch.tensor(e.types), torch.tensor(lens))
        out[i, : per_token.numel()] = per_token
    return out
