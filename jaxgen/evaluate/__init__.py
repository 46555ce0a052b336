"""Evaluation: perplexity of a text or a prepared split, BLEU / ROUGE of generations."""
