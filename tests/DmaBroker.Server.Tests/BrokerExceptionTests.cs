using DmaBroker.Client;
using DmaBroker.Protocol.V1;
using Google.Protobuf.WellKnownTypes;
using Google.Rpc;
using Grpc.Core;

namespace DmaBroker.Server.Tests;

/// <summary>How the client library reads a failure: the errno, the raw reason, and the type a caller catches.</summary>
public sealed class BrokerExceptionTests
{
    [Theory]
    [InlineData(StatusCode.FailedPrecondition, "dmabroker", "EBUSY", typeof(BrokerException), Errno.EBUSY, "EBUSY")]
    [InlineData(StatusCode.ResourceExhausted, "dmabroker", "EMFILE", typeof(BrokerException), Errno.EMFILE, "EMFILE")]
    [InlineData(StatusCode.Unauthenticated, "dmabroker", "EACCES", typeof(BrokerAuthenticationException), Errno.EACCES, "EACCES")]
    [InlineData(StatusCode.DeadlineExceeded, "dmabroker", "ETIMEDOUT", typeof(BrokerException), Errno.ETIMEDOUT, "ETIMEDOUT")]
    [InlineData(StatusCode.FailedPrecondition, "dmabroker", "EFUTURE", typeof(BrokerException), Errno.Unknown, "EFUTURE")]
    [InlineData(StatusCode.FailedPrecondition, "dmabroker", "Unknown", typeof(BrokerException), Errno.Unknown, "Unknown")]
    [InlineData(StatusCode.FailedPrecondition, "dmabroker", "16", typeof(BrokerException), Errno.Unknown, "16")]
    [InlineData(StatusCode.ResourceExhausted, "proxy.example", "RATE_LIMITED", typeof(BrokerException), Errno.Unknown, "ResourceExhausted")]
    [InlineData(StatusCode.Unavailable, null, null, typeof(BrokerUnavailableException), Errno.Unknown, "Unavailable")]
    [InlineData(StatusCode.DeadlineExceeded, null, null, typeof(BrokerUnavailableException), Errno.Unknown, "DeadlineExceeded")]
    public void From_RpcException_TypeErrnoAndReasonFollowStatusAndErrorInfo(
        StatusCode code, string? domain, string? reason, System.Type type, Errno errno, string expectedReason)
    {
        var status = new Google.Rpc.Status { Code = (int)code, Message = "rejected" };
        if (domain is not null)
            status.Details.Add(Any.Pack(new ErrorInfo { Domain = domain, Reason = reason ?? "" }));

        var e = BrokerException.From(status.ToRpcException());

        Assert.Equal((type, errno, expectedReason, (StatusCode?)code), (e.GetType(), e.Errno, e.Reason, e.StatusCode));
    }

    [Fact]
    public void EnsureOk_DeviceErrorThisClientDoesNotKnow_UnknownErrnoRawReasonKept()
    {
        var result = new DmaResult(7, false, default, 0, null, new DmaError { Reason = "EFUTURE", Message = "a newer device's error" });

        var e = Assert.Throws<DmaRequestException>(() => result.EnsureOk());

        Assert.Equal((Errno.Unknown, "EFUTURE", (StatusCode?)null, 7ul), (e.Errno, e.Reason, e.StatusCode, e.Tag));
    }
}
