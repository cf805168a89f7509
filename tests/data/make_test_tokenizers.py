"""Make the two small tokenizers the compression tests use (run once; outputs are committed).

A byte-level BPE (GPT-2 style: partial UTF-8 bytes decode to U+FFFD) and a Metaspace
BPE (SentencePiece style), both trained on real text: a slice of the Python standard
library plus a few lines with accents, case and spacing variants.
"""

import sysconfig
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

HERE = Path(__file__).parent
EXTRA = [
    "Café CAFÉ café cafe Cafe naïve NAÏVE Ångström ångström Über über ÜBER",
    "Ｆｕｌｌｗｉｄｔｈ text, ligature ﬁle, Æsir, Straße, İstanbul, ﬀ, ², ½",
    "  Hello\tWorld \r\n HELLO world\n\n\tindented    spaces   ",
    "Ελληνικά ΕΛΛΗΝΙΚΑ русский РУССКИЙ 中文 日本語 한국어 emoji 🙂🙃",
]


def texts():
    root = Path(sysconfig.get_paths()["stdlib"])
    names = ["textwrap.py", "string.py", "glob.py", "fnmatch.py", "unicodedata.py", "locale.py", "shlex.py"]
    out = [(root / n).read_text(encoding="utf-8") for n in names if (root / n).exists()]
    return out + EXTRA * 20


def main():
    corpus = texts()
    bl = Tokenizer(models.BPE())
    bl.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bl.decoder = decoders.ByteLevel()
    bl.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=1024, special_tokens=["<|endoftext|>", "<|pad|>", "<|user|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    bl.add_tokens(["Python", "PYTHON"])
    bl.save(str(HERE / "tokenizer_bytelevel.json"))

    ms = Tokenizer(models.BPE(unk_token="<unk>"))
    ms.pre_tokenizer = pre_tokenizers.Metaspace()
    ms.decoder = decoders.Metaspace()
    ms.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=800, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], show_progress=False))
    ms.save(str(HERE / "tokenizer_metaspace.json"))


if __name__ == "__main__":
    main()
