"""The default codec list of `bench codecs`, importable without torch (the CLI shows it in --help)."""

DEFAULT_CODECS = ("fp32,fp16,bf16,int8,int8+out:4,had+int8,had+int8+out:4,int6,int6+out:4,had+int6,had+int6+out:4,"
                  "int4,int4+out:8,had+int4,"
                  "had+int4+out:4,int3,had+int3,had+int3+out:4,int2,had+int2,pca:64,pca:128,pca:256,"
                  "pca:256+int8,fp16+zstd,int8+zstd,had+int4+zstd")
DEFAULT_PAIRS = "had+int6+out:4,had+int8+out:4;int6+out:4,int8+out:4;had+int6+out:4,had+int8+out:2"
