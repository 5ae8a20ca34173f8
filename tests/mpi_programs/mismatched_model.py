"""Ranks build different models: DataParallel must fail on every rank, no hang."""
import distprop as dp
from distprop import nn

comm = dp.init()
net = nn.Sequential(nn.Linear(3, 4 + comm.rank), nn.ReLU(), nn.Linear(4 + comm.rank, 2))
dp.DataParallel(net, comm)
