"""Per-word attributions of a text's cross-modal similarity (imported only by ``cmma evaluate``).

Gradient x input on the sentence model's token embeddings, of the cosine similarity between the text's
projected embedding and the other modality's unit embedding; word pieces are merged into words. The text
is the material's first one (its description, else its first synthesis procedure); a material with several
synthesis texts is embedded as their pooled mean, so its words explain one of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cmma_cli.modalities.base import Attribution, ExplainContext

SPECIAL_TOKENS = {"[CLS]", "[SEP]", "[PAD]", "<s>", "</s>", "<pad>"}


def token_attributions(encoder, head, text: str, other: torch.Tensor) -> list[tuple[str, float]]:
    """(word, gradient x input) for the words of ``text`` against the unit vector ``other``."""
    sentence = encoder._model()
    device = next(sentence.parameters()).device
    tokens = sentence.tokenizer([text], truncation=True, max_length=encoder.spec["max_length"], return_tensors="pt")
    features = {k: v.to(device) for k, v in tokens.items()}
    embedding_layer = sentence[0].auto_model.get_input_embeddings()
    captured: dict[str, torch.Tensor] = {}

    def keep(module, inp, out):
        out = out.detach().requires_grad_(True)
        captured["e"] = out
        return out

    hook = embedding_layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            vec = sentence(dict(features))["sentence_embedding"]
            z = F.normalize(head(vec.float()), dim=-1)[0]
            (z @ other).backward()
    finally:
        hook.remove()
    e = captured["e"]
    scores = (e.grad * e).sum(-1)[0].detach().cpu().numpy()
    pieces = sentence.tokenizer.convert_ids_to_tokens(features["input_ids"][0].tolist())
    words: list[tuple[str, float]] = []
    for token, score in zip(pieces, scores):
        if token in SPECIAL_TOKENS:
            continue
        if token.startswith("##") and words:
            words[-1] = (words[-1][0] + token[2:], words[-1][1] + float(score))
        else:
            words.append((token, float(score)))
    return words


def attribute(encoder, head, inputs, other: torch.Tensor, ctx: ExplainContext) -> Attribution:
    """``text`` (the text explained), ``tokens`` (every word, in order) and ``top_tokens`` (the strongest)."""
    from cmma_cli.modalities.text import material_texts

    text = material_texts(ctx.row, ctx.spec["sources"])[0][0]
    tokens = [{"token": w, "score": s} for w, s in token_attributions(encoder, head, text, other)]
    fields = {"text": text, "tokens": tokens, "top_tokens": sorted(tokens, key=lambda t: -abs(t["score"]))[: ctx.top]}

    def plot(ax) -> None:
        top = fields["top_tokens"][::-1]
        ax.barh([t["token"] for t in top], [t["score"] for t in top],
                color=["tab:green" if t["score"] >= 0 else "tab:red" for t in top])
        ax.set_title("words by gradient x input", fontsize=9)

    return Attribution(fields, plot)
