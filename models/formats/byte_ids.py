"""The byte vocabulary every byte-level model and the byte tokenizer share: ids 0-255 are the bytes, 256
ends a document."""

BYTES = 256
EOS = 256            # end of document ([S] in HAT)
VOCAB_SIZE = 257     # the byte tokenizer's ids; a model may predict symbols beyond (HAT's end of word, 257)
