"""The DJL handler's machinery (handler/model.py is the module DJL imports): the three modes DJL runs a
Python model in, the items its Java front end reads, and its adapter calls."""
