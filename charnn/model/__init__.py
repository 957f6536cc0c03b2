"""The network (CharRNN: lstm | gru | rnn), its fast generation kernels, devices, and --size auto."""
