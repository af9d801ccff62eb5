"""hpcjobs: batch training of TensorFlow/Keras image classifiers on Slurm clusters."""
__version__ = "0.1.0"
