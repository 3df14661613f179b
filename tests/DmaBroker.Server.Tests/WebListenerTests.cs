using System.Net;
using DmaBroker.Client;
using Grpc.Core;
using Microsoft.Extensions.DependencyInjection;

namespace DmaBroker.Server.Tests;

/// <summary>
/// The <c>--http-listen</c> gate (SPEC §13), through /metrics: web endpoints answer only on the
/// web listener, gRPC only on the gRPC listeners, and the web listener needs the viewer role —
/// 401 with a Bearer challenge without a credential, 403 for a principal without the role.
/// </summary>
public sealed class WebListenerTests
{
    private const string Viewer = "viewer-token";
    private const string Nobody = "nobody-token";

    private static readonly string Auth = $$"""
        {
          "principals": [
            { "name": "token:viewer", "token_sha256": "{{SecureBroker.Sha256(Viewer)}}", "roles": ["viewer"] },
            { "name": "token:nobody", "token_sha256": "{{SecureBroker.Sha256(Nobody)}}", "roles": [] }
          ]
        }
        """;

    [Fact]
    public async Task Metrics_OnGrpcListener_NotFound()
    {
        await using var broker = await TestBroker.StartAsync();

        using var response = await MetricsTests.GetAsync(broker.Address + "/metrics", version: HttpVersion.Version20);

        Assert.Equal(HttpStatusCode.NotFound, response.StatusCode);
        Assert.Contains("--http-listen", await response.Content.ReadAsStringAsync(), StringComparison.Ordinal);
    }

    [Fact]
    public async Task GrpcCall_OnWebListener_NotServed()
    {
        await using var broker = await TestBroker.StartAsync();
        using var client = BrokerClient.Connect(broker.WebAddress);

        var e = await Assert.ThrowsAnyAsync<Exception>(() => client.ListDevicesAsync().WaitAsync(TestBroker.Timeout));

        Assert.True(e is RpcException or BrokerException, e.ToString());
    }

    [Fact]
    public async Task HttpListenNone_NoMetricsAnywhere()
    {
        await using var broker = await TestBroker.StartAsync(null, "--http-listen", "none");

        using var response = await MetricsTests.GetAsync(broker.Address + "/metrics", version: HttpVersion.Version20);

        Assert.Throws<InvalidOperationException>(() => broker.WebAddress);
        Assert.Equal(HttpStatusCode.NotFound, response.StatusCode);
        Assert.False(broker.Services.GetRequiredService<Hosting.MetricsExport>().Prometheus);
    }

    [Theory]
    [InlineData(null, HttpStatusCode.Unauthorized)]
    [InlineData("wrong-token", HttpStatusCode.Unauthorized)]
    [InlineData(Nobody, HttpStatusCode.Forbidden)]
    [InlineData(Viewer, HttpStatusCode.OK)]
    public async Task Metrics_WithAuthFile_NeedsTheViewerRole(string? bearer, HttpStatusCode expected)
    {
        await using var broker = await SecureBroker.StartAsync(Auth);

        using var response = await MetricsTests.GetAsync(broker.Web + "/metrics", bearer);

        Assert.Equal(expected, response.StatusCode);
        if (expected == HttpStatusCode.Unauthorized)
            Assert.Equal(["Basic", "Bearer"], response.Headers.WwwAuthenticate.Select(c => c.Scheme));
        if (expected == HttpStatusCode.OK)
            Assert.Equal(0, PrometheusText.Parse(await response.Content.ReadAsStringAsync()).Value("dmabroker_sessions"));
    }
}
