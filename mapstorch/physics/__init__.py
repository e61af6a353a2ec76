"""The MAPS spectrum model: line library, peak shapes, fast peak evaluation, model, SNIP."""
