"""The network (CharRNN: lstm | gru | rnn) and its shape; what running it
needs (devices, precision, the fast generation kernels); its loss on a text;
the size rule of --size auto."""
