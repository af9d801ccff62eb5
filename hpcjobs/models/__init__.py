"""Models: the built-in nets, backbones (keras.applications), weights and transfer."""
