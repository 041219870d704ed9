"""The seed program as the README shows it, unmodified but for its log file
(os.devnull: the thread logs without pause).  It never ends by itself."""

import logging
import os
from logging.handlers import QueueHandler, QueueListener
from multiprocessing import Pool
from queue import Queue
from threading import Thread

log_queue = Queue()
QueueListener(log_queue, logging.FileHandler(os.devnull)).start()
logging.getLogger().addHandler(QueueHandler(log_queue))


def log_forever():
    while True:
        logging.error("busy")


if __name__ == "__main__":
    Thread(target=log_forever).start()
    while True:
        with Pool() as pool:  # fork
            pool.apply(logging.error, ("hi",))  # the worker blocks forever on log_queue's mutex
