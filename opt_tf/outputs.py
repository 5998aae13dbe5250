"""The spec's output records, made returnable from `tf.function`.

`tf.function` only returns Tensors, None and structures `tf.nest` understands. These subclasses of the
opt_spec records (so `isinstance(out, opt_spec.outputs.CausalLMOutputWithPast)` holds) add TensorFlow's
nest protocol, which flattens a record into its fields in declaration order and rebuilds it.
"""

from __future__ import annotations

import dataclasses

from opt_spec import outputs as spec_outputs


class _Nestable:
    def __tf_flatten__(self):
        names = tuple(f.name for f in dataclasses.fields(self))
        return names, tuple(getattr(self, n) for n in names)

    @classmethod
    def __tf_unflatten__(cls, names, components):
        return cls(**dict(zip(names, components)))


class BaseModelOutputWithPast(_Nestable, spec_outputs.BaseModelOutputWithPast):
    pass


class CausalLMOutputWithPast(_Nestable, spec_outputs.CausalLMOutputWithPast):
    pass


class SequenceClassifierOutputWithPast(_Nestable, spec_outputs.SequenceClassifierOutputWithPast):
    pass


class QuestionAnsweringModelOutput(_Nestable, spec_outputs.QuestionAnsweringModelOutput):
    pass


class GenerateDecoderOnlyOutput(_Nestable, spec_outputs.GenerateDecoderOnlyOutput):
    pass


class GenerateBeamDecoderOnlyOutput(_Nestable, spec_outputs.GenerateBeamDecoderOnlyOutput):
    pass
