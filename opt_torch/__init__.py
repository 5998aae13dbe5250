"""optkit's PyTorch backend: OPT as torch.nn.Modules whose state_dict keys are the canonical names."""

from opt_spec import OPTConfig

from .modeling import (OPTForCausalLM, OPTForQuestionAnswering, OPTForSequenceClassification, OPTModel,
                       OPTPreTrainedModel)

__all__ = ["OPTConfig", "OPTForCausalLM", "OPTForQuestionAnswering", "OPTForSequenceClassification", "OPTModel",
           "OPTPreTrainedModel"]
