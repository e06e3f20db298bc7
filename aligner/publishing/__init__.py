"""Publishing a trained run: its model card, and the push to the Hugging Face Hub."""
